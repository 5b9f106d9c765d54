"""Boxes drawn on the Generate tab's regions canvas: two clicks make a box, in the table's first blank row."""

from __future__ import annotations

from studio.app.regions import BLANK_ROWS, CANVAS, drawn_box, preview, regions_from_rows


def clicks(rows, *points):
    pending = None
    for x, y in points:
        rows, pending = drawn_box(rows, pending, x * CANVAS, y * CANVAS)
    return rows, pending


def test_the_first_click_holds_a_corner_and_leaves_the_table():
    rows, pending = drawn_box(BLANK_ROWS, None, 64, 128)
    assert rows == [list(r) for r in BLANK_ROWS] and pending == [0.25, 0.5]
    assert preview(rows, pending=pending).tobytes() != preview(rows).tobytes()  # the corner is marked


def test_boxes_fill_the_blank_rows_then_new_ones_in_any_corner_order():
    rows, pending = clicks(BLANK_ROWS, (0.8, 0.9), (0.1, 0.2))  # bottom-right first
    assert pending is None and rows[0][:4] == [0.1, 0.2, 0.8, 0.9] and rows[1] == list(BLANK_ROWS[1])
    rows, _ = clicks(rows, (0.5, 0.5), (1.0, 1.0))
    assert rows[1][:4] == [0.5, 0.5, 1.0, 1.0]
    rows, _ = clicks(rows, (0.0, 0.0), (0.3, 0.3))
    assert len(rows) == 3 and rows[2] == [0.0, 0.0, 0.3, 0.3, "", "", 1.0]


def test_a_row_with_a_prompt_is_never_overwritten_and_clicks_outside_are_clamped():
    typed = [[0, 0, 0.5, 1, "a red circle", "", 1.0], [0.5, 0, 1, 1, "", "", 1.0]]
    rows, _ = clicks(typed, (-0.2, 0.1), (0.4, 1.3))
    assert rows[0] == typed[0] and rows[1][:4] == [0.0, 0.1, 0.4, 1.0]


def test_two_clicks_on_one_spot_start_again_from_it():
    rows, pending = clicks(BLANK_ROWS, (0.3, 0.3), (0.305, 0.3))
    assert rows == [list(r) for r in BLANK_ROWS] and pending == [0.305, 0.3]  # the second spot held
    rows, pending = drawn_box(rows, pending, 0.6 * CANVAS, 0.7 * CANVAS)
    assert pending is None and rows[0][:4] == [0.3, 0.3, 0.6, 0.7]


def test_a_drawn_box_with_a_prompt_becomes_a_region():
    rows, _ = clicks(BLANK_ROWS, (0.25, 0.25), (0.75, 0.75))
    rows[0][4] = "a red circle"
    (region,) = regions_from_rows(None, rows)
    assert region.box == (0.25, 0.25, 0.75, 0.75) and region.prompt == "a red circle"
