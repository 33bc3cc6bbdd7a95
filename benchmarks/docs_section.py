"""One generated section of docs/benchmarks.md, rewritten in place between its markers (appended under its
heading the first time), for the benchmark scripts that own a section."""

from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(begin: str, end: str, heading: str, text: str, page: Path = PAGE) -> None:
    content = page.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in content:
        content = content[: content.index(begin)] + block + content[content.index(end) + len(end) :]
    else:
        content = content.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    page.write_text(content)
