"""Every figure in README.md's tables comes from a committed result: each number is, at the README's precision,
a number of some file under benchmarks/results/ (a rounding of it; thousands separators aside)."""

import functools
import re

from conftest import ROOT

NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e-?\d+)?")


def _tables(text):
    """Rows of each markdown table, header first."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


@functools.cache
def _results():
    files = (ROOT / "benchmarks" / "results").iterdir()
    text = "\n".join(p.read_text(errors="replace") for p in files if p.suffix in (".md", ".json", ".csv", ".log"))
    return [float(n.replace(",", "")) for n in NUMBER.findall(text)]


@functools.cache
def _rounded(kind, digits):
    return {f"{value:.{digits}{kind}}" for value in _results()}


def _backed(number: str) -> bool:
    plain = number.replace(",", "")
    if "e" in plain:
        digits = len(plain.split("e")[0].partition(".")[2])
        return f"{float(plain):.{digits}e}" in _rounded("e", digits)
    digits = len(plain.partition(".")[2])
    return f"{float(plain):.{digits}f}" in _rounded("f", digits)


def _unbacked(readme: str):
    missing = []
    for table in _tables(readme):
        if "package" in table[0]:  # the supported-versions table: versions, not measurements
            continue
        for row in table[2:]:
            missing += [f"{n} in {row.strip()[:60]}" for n in NUMBER.findall(row.replace("**", "")) if not _backed(n)]
    return missing


def test_every_number_in_the_readme_tables_is_in_a_committed_result():
    readme = (ROOT / "README.md").read_text()
    missing = _unbacked(readme)
    assert not missing, "README figures with no committed result:\n" + "\n".join(missing)
    # control: a figure off by one in its last digit is caught
    assert _unbacked(readme.replace("124,539", "124,537", 1))
