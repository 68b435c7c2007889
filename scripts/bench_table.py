"""Reads criterion's estimates from target/criterion and prints the benchmark table (ratios to the floor)."""
import json
import pathlib
import platform
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRITERION = ROOT / "target" / "criterion"
FLOOR = "floor/hmac_json_round_trip"


def median_ns(bench: str) -> float:
    data = json.loads((CRITERION / bench / "new" / "estimates.json").read_text())
    return data["median"]["point_estimate"]


def main() -> None:
    benches = sorted(
        str(p.parent.parent.relative_to(CRITERION))
        for p in CRITERION.glob("*/*/new/estimates.json")
    )
    floor = median_ns(FLOOR)
    cpu = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    rows = [
        f"Measured on {platform.machine()}, {cpu} cores, by `scripts/bench.sh` (criterion medians).",
        "",
        "| benchmark | median | per second (one core) | ratio to floor |",
        "|---|---|---|---|",
    ]
    for b in benches:
        ns = median_ns(b)
        rows.append(f"| `{b}` | {ns / 1000:.2f} us | {1e9 / ns:,.0f} | {ns / floor:.2f}x |")
    table = "\n".join(rows)
    print(table)
    if "--write" in sys.argv:
        path = ROOT / "BENCHMARKS.md"
        text = path.read_text()
        start, end = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        path.write_text(f"{before}{start}\n{table}\n{end}{after}")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
