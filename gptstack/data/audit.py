"""Where the text of a `gptstack data prepare` run went, and what to change when most of it is gone.

Every stage that drops text counts the UTF-8 bytes it dropped under `stage/rule`: a filter rule that
drops whole documents (`gopher_quality/max_doc_words`), a filter that removes lines and keeps the
document (`c4/lines_removed`), the quality classifier (`quality/pareto_rejected`) and deduplication
(`dedup/exact`, `dedup/fuzzy`). The base is the text that reaches the filters: HTML markup that
extraction strips is not text, so it is not counted as dropped.

`byte_audit` sums these into the manifest's "bytes" entry. When more than half the text was dropped,
`warnings_for` says so, naming the rule that dropped most and the option that relaxes it (the manifest
keeps the warning and `format_stats` prints it last). When nothing at all was kept, `check_kept`
raises PrepareError with the same advice before a shard is written: one big file such as Tiny
Shakespeare (200k words) is a single document, and Gopher's 100k-word limit drops it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import fields

from gptstack.data.filters import FILTERS, build_filter

WARN_FRACTION = 0.5  # warn when more than this share of the text was dropped
READ_HINTS = {  # why a document could not be read → what to change
    "too_large": "--max-doc-bytes N reads larger documents (now {max_doc_bytes:,})",
    "missing_field": "--text-field names the JSONL/Parquet field that holds the text",
}


# Filter rules whose threshold has another name: (filter, rule) → (parameter, a much looser value).
# The other rules are named after their threshold (max_doc_words) or its tail (stop_words → min_stop_words).
RULE_PARAMETERS = {
    ("language", "low_language_score"): ("min_score", 0.0),
    ("c4", "too_few_sentences"): ("min_sentences", 0),
    ("fineweb", "line_punct_ratio"): ("line_punct_thr", 0.0),
    ("fineweb", "short_line_ratio"): ("short_line_thr", 1.0),
    ("fineweb", "char_dup_ratio"): ("char_duplicates_ratio", 1.0),
    ("fineweb", "list_ratio"): ("new_line_ratio", 3.0),
}


class PrepareError(ValueError):
    """A `data prepare` run that would write unusable shards; the message names the rule and the fix."""


def byte_audit(text_bytes: int, kept_bytes: int, dropped: dict[str, dict[str, int]]) -> dict:
    """{text_bytes, kept_bytes, dropped_fraction, dropped: {"stage/rule": bytes}, largest first}."""
    by_rule = Counter({f"{stage}/{rule}": n for stage, rules in dropped.items() for rule, n in rules.items() if n})
    return {
        "text_bytes": text_bytes,
        "kept_bytes": kept_bytes,
        "dropped_fraction": 1 - kept_bytes / text_bytes if text_bytes else 0.0,
        "dropped": dict(by_rule.most_common()),
    }


def warnings_for(audit: dict, filters: dict, max_doc_bytes: int) -> list[str]:
    """A loud line when more than half of the text was dropped: which rule, and how to relax it."""
    if audit["dropped_fraction"] <= WARN_FRACTION or not audit["dropped"]:
        return []
    rule, n = next(iter(audit["dropped"].items()))
    return [
        f"WARNING: data prepare dropped {audit['dropped_fraction']:.0%} of the input text "
        f"({audit['text_bytes']:,} → {audit['kept_bytes']:,} bytes); most of it by {rule} "
        f"({n:,} bytes, {n / audit['text_bytes']:.0%}). To keep more: {how_to_relax(rule, filters, max_doc_bytes)}."
    ]


def check_kept(n_kept: int, audit: dict, drops: dict, skipped: dict, filters: dict, max_doc_bytes: int) -> None:
    """Raise PrepareError naming the rule that dropped most, and its fix, when no document was kept."""
    if n_kept:
        return
    counts = {f"read/{r}": n for r, n in skipped.items()}
    counts |= {f"{stage}/{r}": n for stage, rules in drops.items() for r, n in rules.items() if n}
    removed = ", ".join(f"{k} {n:,}" for k, n in Counter(counts).most_common()) or "none"
    if audit["dropped"]:
        rule, n = next(iter(audit["dropped"].items()))
        why = f"{rule} dropped the most text ({n:,} of {audit['text_bytes']:,} bytes)"
    elif counts:
        rule = Counter(counts).most_common(1)[0][0]
        why = f"{rule} removed the most documents"
    else:
        raise PrepareError(
            "data prepare read no documents: the inputs hold no .txt/.md/.py/.html/.jsonl/.parquet files"
        )
    raise PrepareError(
        f"data prepare kept no documents (removed: {removed}): {why}. "
        f"To keep more: {how_to_relax(rule, filters, max_doc_bytes)}."
    )


def how_to_relax(rule: str, filters: dict, max_doc_bytes: int) -> str:
    """The option that lets through what `rule` ("stage/rule") removed."""
    stage, _, name = rule.partition("/")
    if stage == "dedup":
        return "--dedup exact keeps near-duplicates, --dedup none keeps every copy"
    if stage == "quality":
        return "leave out --quality-model, or train the classifier on positives that look like this text"
    if stage == "extract":
        return "extraction found no main text in these HTML pages; give their text as .txt instead"
    if stage == "read":
        return READ_HINTS.get(name, "those files could not be read as text").format(max_doc_bytes=max_doc_bytes)
    off = f"--filters '{json.dumps({stage: False})}' turns the {stage} filter off"
    param = _parameter(stage, name)
    if param is None:
        return off
    now = getattr(build_filter(stage, **(filters.get(stage) or {})), param)
    looser = RULE_PARAMETERS[(stage, name)][1] if (stage, name) in RULE_PARAMETERS else _looser(param, now)
    return f"--filters '{json.dumps({stage: {param: looser}})}' ({param} is {now} now), or {off}"


def _parameter(stage: str, rule: str) -> str | None:
    """The filter's threshold behind `rule`: RULE_PARAMETERS, or the field named like the rule."""
    if (stage, rule) in RULE_PARAMETERS:
        return RULE_PARAMETERS[(stage, rule)][0]
    if stage not in FILTERS:
        return None
    names = {f.name for f in fields(FILTERS[stage])}
    for candidate in (rule, f"max_{rule}", f"min_{rule}", f"filter_{rule}"):
        if candidate in names:
            return candidate
    return None


def _looser(param: str, value: bool | int | float) -> bool | int | float:
    """A value of the threshold that lets far more through: off for a switch, 0 for a minimum, 20× for a
    maximum (100k words → 2M: a whole book is one document)."""
    if isinstance(value, bool):
        return False
    if param.startswith("min_"):
        return 0
    return value * 20
