"""The application: the command line and its commands, the job queue and workers, the services the page
uses (built in one place), the workspace and the evaluation runner.

The only part of `studio` that imports the methods (`trainers`, `merging`) or the page (`ui`).
"""
