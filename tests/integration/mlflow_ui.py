"""The MLflow UI's runs table read from a real headless Chromium (Selenium + chromedriver).

Debian's ``chromium`` and ``chromium-driver`` packages provide the browser and its driver
(``.ci/run`` installs them); without them the UI test is skipped with that reason.

The runs table is an ag-grid: each run is one ``.ag-row`` per column block (pinned left,
centre), all with the run id as ``row-id``. MLflow nests child runs itself: a child follows
its parent, and its name is indented one step (24 px) further. Columns are virtualised, so
the window is wide enough to render them all. Also a tool:

    python -m tests.integration.mlflow_ui URL screenshot.png [--expand]

saves what a user sees at URL (the README's screenshot), with the first parent expanded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def missing_browser() -> str | None:
    """Why the UI cannot be opened here (None: it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not any(shutil.which(name) for name in CHROMIUM_NAMES):
        return "no chromium on PATH (apt-get install -y chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver on PATH (apt-get install -y chromium-driver)"
    return None


NEST_STEP_PX = 24  # the indent per nesting level before a run's name


@dataclass
class Row:
    run_id: str
    depth: int  # 0 for a top-level run, 1 for a child shown under its parent
    cells: dict[str, str]  # column header -> the cell's text


class RunsTable:
    """A headless browser on one MLflow runs-table page."""

    def __init__(self, width: int = 2600, height: int = 1000):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = next(filter(None, map(shutil.which, CHROMIUM_NAMES)))
        for argument in (
            "--headless=new",
            "--no-sandbox",  # root in CI containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--window-size={width},{height}",
        ):
            options.add_argument(argument)
        # An explicit driver path: Selenium Manager never tries to download one.
        self.driver = webdriver.Chrome(
            service=Service(shutil.which("chromedriver")), options=options
        )

    def close(self) -> None:
        self.driver.quit()

    def __enter__(self) -> RunsTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, url: str, timeout: float = 90.0) -> None:
        """Load ``url`` and wait until the table shows at least one run."""
        self.driver.get(url)
        self._wait(lambda: self.rows(), timeout, f"no run rows rendered at {url}")

    def headers(self) -> list[str]:
        """The column headers, left to right (column groups such as "Metrics" left out)."""
        from selenium.webdriver.common.by import By

        cells = self.driver.find_elements(By.CSS_SELECTOR, ".ag-header-cell")
        ordered = sorted(cells, key=lambda c: int(c.get_attribute("aria-colindex") or 0))
        return [c.text.strip() for c in ordered if c.text.strip()]

    def rows(self) -> list[Row]:
        """Every rendered run row, top to bottom, with its cells keyed by column header."""
        from selenium.webdriver.common.by import By

        header_by_col = {}
        for cell in self.driver.find_elements(By.CSS_SELECTOR, ".ag-header-cell[col-id]"):
            if cell.text.strip():
                header_by_col[cell.get_attribute("col-id")] = cell.text.strip()
        rows: dict[str, Row] = {}
        order: list[tuple[int, str]] = []
        for element in self.driver.find_elements(By.CSS_SELECTOR, ".ag-row[row-id]"):
            run_id = element.get_attribute("row-id")
            row = rows.get(run_id)
            if row is None:
                row = rows[run_id] = Row(run_id, 0, {})
                order.append((int(element.get_attribute("row-index") or 0), run_id))
            for cell in element.find_elements(By.CSS_SELECTOR, ".ag-cell[col-id]"):
                col_id = cell.get_attribute("col-id")
                header = header_by_col.get(col_id)
                if header:
                    row.cells[header] = cell.text.strip()
                if col_id == "attributes.`Run Name`":
                    row.depth = self._nesting_depth(cell)
        return [rows[run_id] for _, run_id in sorted(order)]

    @staticmethod
    def _nesting_depth(name_cell) -> int:
        from selenium.webdriver.common.by import By

        spacers = name_cell.find_elements(By.CSS_SELECTOR, "div[style*='width']")
        if not spacers:
            return 0
        width = float(spacers[0].value_of_css_property("width").removesuffix("px") or 0)
        return max(round(width / NEST_STEP_PX) - 1, 0)

    def expand(self, run_id: str, timeout: float = 60.0) -> None:
        """Click the expander beside a parent run's name and wait for its children."""
        from selenium.webdriver.common.by import By

        row = self.driver.find_element(
            By.CSS_SELECTOR,
            f".ag-row[row-id='{run_id}'] button[data-component-id*='runnamecellrenderer']",
        )
        row.click()
        self._wait(
            lambda: any(r.depth > 0 for r in self.rows()), timeout, f"{run_id} shows no children"
        )

    def close_side_panel(self) -> None:
        """Close MLflow's assistant panel, if it is open (it takes a third of the page)."""
        from selenium.webdriver.common.by import By

        for button in self.driver.find_elements(
            By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"
        ):
            button.click()

    def page_text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path

    @staticmethod
    def _wait(condition, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except Exception:  # the page re-rendered under us: look again
                pass
            time.sleep(0.5)
        raise TimeoutError(message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.integration.mlflow_ui")
    parser.add_argument("url")
    parser.add_argument("out", type=Path)
    parser.add_argument("--expand", action="store_true", help="open the first parent run")
    parser.add_argument("--width", type=int, default=1800)
    parser.add_argument("--height", type=int, default=800)
    args = parser.parse_args(argv)
    reason = missing_browser()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    with RunsTable(args.width, args.height) as table:
        table.open(args.url)
        table.close_side_panel()
        if args.expand:
            table.expand(table.rows()[0].run_id)
            time.sleep(2)  # let the metric cells of the children render
        print(f"wrote {table.screenshot(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
