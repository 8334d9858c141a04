"""Print the quickstart's answers before and after fine-tuning, and check them against the expected facts.

Exit status 1 if the fine-tuned model misses an expected fact, or the base model already knew one (then the
quickstart would prove nothing).
"""

import json
import sys

from rich.console import Console
from rich.table import Table


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(questions_path, before_path, after_path) -> int:
    questions, before, after = read_jsonl(questions_path), read_jsonl(before_path), read_jsonl(after_path)
    if not (len(questions) == len(before) == len(after)):
        print(f"expected {len(questions)} answers each, got {len(before)} before and {len(after)} after")
        return 1
    table = Table(title="Quillhaven questions: base model vs fine-tuned", show_lines=True)
    for column in ("question", "expected", "before", "after"):
        table.add_column(column, overflow="fold")
    failures = []
    for q, b, a in zip(questions, before, after):
        expect = q["expect"].lower()
        knew_before = expect in b["response"].lower()
        knows_after = expect in a["response"].lower()
        table.add_row(q["question"], q["expect"], _mark(b["response"], knew_before), _mark(a["response"], knows_after))
        if knew_before:
            failures.append(f"the base model already answers {q['expect']!r}")
        if not knows_after:
            failures.append(f"the fine-tuned model misses {q['expect']!r}")
    Console(width=160).print(table)
    if failures:
        print("quickstart check FAILED: " + "; ".join(failures))
        return 1
    print(f"quickstart check passed: the fine-tuned model knows all {len(questions)} facts, the base model none.")
    return 0


def _mark(text: str, hit: bool) -> str:
    return f"{'[green]✓[/green]' if hit else '[red]✗[/red]'} {text}"


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
