"""Every figure in README.md's tables comes from a committed result: each number is, at the README's precision,
a number of some file under benchmarks/results/ (a rounding of it; thousands separators aside); and every results
file says which code it measured (benchmarks/results/COMMITS.md)."""

import functools
import json
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
    text = "\n".join(p.read_text(errors="replace") for p in files
                     if p.suffix in (".md", ".json", ".csv", ".log") and p.name != "COMMITS.md")
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
    # control: the first table figure, its last digit changed, is caught
    row = next(r for t in _tables(readme) if "package" not in t[0] for r in t[2:] if NUMBER.search(r.replace("**", "")))
    figure = NUMBER.search(row.replace("**", "")).group()
    changed = figure[:-1] + str((int(figure[-1]) + 3) % 10)
    assert _unbacked(readme.replace(row, row.replace(figure, changed, 1), 1))


def test_every_result_says_which_code_it_measured():
    results = ROOT / "benchmarks" / "results"
    listed = {}
    for line in (results / "COMMITS.md").read_text().splitlines():
        if match := re.match(r"\| (\S+) \| ([0-9a-f]{7,40})\b", line):
            listed[match.group(1)] = match.group(2)
    files = {p.name for p in results.iterdir() if p.name != "COMMITS.md"}
    assert files - set(listed) == set(), "results files missing from benchmarks/results/COMMITS.md"
    assert set(listed) - files == set(), "COMMITS.md lists files that do not exist"
    for name in sorted(files):
        if name.endswith(".json"):
            data = json.loads((results / name).read_text())
            recorded = data.get("environment", {}).get("commit") if isinstance(data, dict) else None
            if recorded:  # measured since the commit was recorded: the index must agree with it
                assert recorded.removesuffix("-dirty").startswith(listed[name][:7]), name
