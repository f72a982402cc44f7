"""Document filters with their published defaults, and PII masking.

Each filter is a dataclass whose fields are its thresholds (override any of them by name) and whose
call returns `(text, None)` to keep a document (possibly with lines removed) or `(None, rule)` to
drop it; the pipeline counts drops per filter and rule. Sources:
- Gopher quality and repetition rules: Rae et al. 2021, "Scaling Language Models", appendix A.1.1,
  with the thresholds datatrove uses for FineWeb.
- C4 line rules: Raffel et al. 2020, section 2.2 ("Colossal Clean Crawled Corpus").
- FineWeb's own rules: Penedo et al. 2024, section 3.5 (datatrove `FineWebQualityFilter`).
- Language: langid.py (Lui & Baldwin 2012), which ships its model; FineWeb keeps English at ≥0.65.
- Code: the Codex data filters (Chen et al. 2021: mean line length ≤100, longest ≤1000) plus
  StarCoder's alphanumeric fraction ≥0.25 and auto-generated-file markers.
Web filters run on text and HTML documents; code documents (.py) get the code filter, because prose
rules would drop every source file.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np

END_PUNCTUATION = (".", "?", "!", '"', "'")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "▪", "◦", "-", "*", "·")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")

Result = tuple[str | None, str | None]


def _words(text: str) -> list[str]:
    return text.split()


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items seen before, characters in them)."""
    seen: set[str] = set()
    count = chars = 0
    for x in items:
        if x in seen:
            count += 1
            chars += len(x)
        else:
            seen.add(x)
    return count, chars


@dataclass
class GopherRepetition:
    name: ClassVar[str] = "gopher_repetition"
    dup_line_frac: float = 0.30
    dup_para_frac: float = 0.30
    dup_line_char_frac: float = 0.20
    dup_para_char_frac: float = 0.20
    top_ngrams: dict = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    dup_ngrams: dict = field(default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})

    def __call__(self, text: str) -> Result:
        n_chars = max(1, len(text))
        paras = [p for p in re.split(r"\n{2,}", text.strip()) if p]
        dup, chars = _duplicates(paras)
        if paras and dup / len(paras) > self.dup_para_frac:
            return None, "dup_para_frac"
        if chars / n_chars > self.dup_para_char_frac:
            return None, "dup_para_char_frac"
        lines = [line for line in text.split("\n") if line.strip()]
        dup, chars = _duplicates(lines)
        if lines and dup / len(lines) > self.dup_line_frac:
            return None, "dup_line_frac"
        if chars / n_chars > self.dup_line_char_frac:
            return None, "dup_line_char_frac"
        words = _words(text)
        for n, limit in self.top_ngrams.items():
            grams = Counter(" ".join(words[i : i + int(n)]) for i in range(len(words) - int(n) + 1))
            if grams:
                top, count = grams.most_common(1)[0]
                if count > 1 and len(top) * count / n_chars > limit:
                    return None, f"top_{n}gram"
        for n, limit in self.dup_ngrams.items():
            n = int(n)
            seen: set[str] = set()
            i = repeated = 0
            while i <= len(words) - n:
                gram = " ".join(words[i : i + n])
                if gram in seen:
                    repeated += len(gram)
                    i += n
                else:
                    seen.add(gram)
                    i += 1
            if repeated / n_chars > limit:
                return None, f"dup_{n}gram"
        return text, None


@dataclass
class GopherQuality:
    name: ClassVar[str] = "gopher_quality"
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2

    def __call__(self, text: str) -> Result:
        words = _words(text)
        content = [w for w in words if any(c.isalnum() for c in w)]
        n = len(content)
        if n < self.min_doc_words:
            return None, "min_doc_words"
        if n > self.max_doc_words:
            return None, "max_doc_words"
        avg = sum(map(len, content)) / n
        if avg < self.min_avg_word_length:
            return None, "min_avg_word_length"
        if avg > self.max_avg_word_length:
            return None, "max_avg_word_length"
        if (text.count("#") + text.count("...") + text.count("…")) / n > self.max_symbol_word_ratio:
            return None, "symbol_word_ratio"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines and sum(line.startswith(BULLETS) for line in lines) / len(lines) > self.max_bullet_lines_ratio:
            return None, "bullet_lines_ratio"
        if lines and sum(line.endswith(("...", "…")) for line in lines) / len(lines) > self.max_ellipsis_lines_ratio:
            return None, "ellipsis_lines_ratio"
        if sum(any(c.isalpha() for c in w) for w in words) / max(1, len(words)) < self.min_alpha_words_ratio:
            return None, "alpha_words_ratio"
        if sum(w.lower() in STOP_WORDS for w in words) < self.min_stop_words:
            return None, "stop_words"
        return text, None


@dataclass
class C4Lines:
    """Keeps lines that end in terminal punctuation and have ≥3 words; drops lines about javascript
    or site policies; drops documents with 'lorem ipsum' or '{' or fewer than 5 sentences left."""

    name: ClassVar[str] = "c4"
    min_words_per_line: int = 3
    max_word_length: int = 1000
    min_sentences: int = 5
    remove_citations: bool = True
    filter_javascript: bool = True
    filter_policy: bool = True
    filter_lorem_ipsum: bool = True
    filter_curly_bracket: bool = True

    def __call__(self, text: str) -> Result:
        lower = text.lower()
        if self.filter_lorem_ipsum and "lorem ipsum" in lower:
            return None, "lorem_ipsum"
        if self.filter_curly_bracket and "{" in text:
            return None, "curly_bracket"
        kept = []
        for line in text.splitlines():
            line = line.strip()
            if self.remove_citations:
                line = CITATION.sub("", line)
            words = line.split()
            if not line.endswith(END_PUNCTUATION) or line.endswith(("...", "…")):
                continue
            if len(words) < self.min_words_per_line or max(map(len, words)) > self.max_word_length:
                continue
            low = line.lower()
            if (self.filter_javascript and "javascript" in low) or (
                self.filter_policy and any(p in low for p in POLICY)
            ):
                continue
            kept.append(line)
        out = "\n".join(kept)
        if len(SENTENCE_END.findall(out)) < self.min_sentences:
            return None, "too_few_sentences"
        return out, None


@dataclass
class FineWebQuality:
    name: ClassVar[str] = "fineweb"
    line_punct_thr: float = 0.12
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3

    def __call__(self, text: str) -> Result:
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return None, "empty"
        if sum(line.rstrip().endswith(END_PUNCTUATION) for line in lines) / len(lines) < self.line_punct_thr:
            return None, "line_punct_ratio"
        if sum(len(line) <= self.short_line_length for line in lines) / len(lines) > self.short_line_thr:
            return None, "short_line_ratio"
        if _duplicates(lines)[1] / max(1, len(text.replace("\n", ""))) > self.char_duplicates_ratio:
            return None, "char_dup_ratio"
        if text.count("\n") / max(1, len(text.split())) > self.new_line_ratio:
            return None, "list_ratio"
        return text, None


_ASCII_ALNUM = np.array([chr(i).isalnum() for i in range(128)], dtype=np.int64)


def _alnum_count(text: str) -> int:
    if text.isascii():  # nearly all code: a table lookup in numpy instead of a Python loop
        return int(_ASCII_ALNUM[np.frombuffer(text.encode(), np.uint8)].sum())
    return sum(c.isalnum() for c in text)


@dataclass
class Code:
    name: ClassVar[str] = "code"
    max_line_length: int = 1000
    max_avg_line_length: float = 100
    min_alnum_fraction: float = 0.25
    autogenerated_markers: tuple = ("auto-generated", "autogenerated", "automatically generated", "do not edit")

    def __call__(self, text: str) -> Result:
        lines = text.splitlines() or [""]
        lengths = [len(line) for line in lines]
        if max(lengths) > self.max_line_length:
            return None, "max_line_length"
        if sum(lengths) / len(lines) > self.max_avg_line_length:
            return None, "avg_line_length"
        if _alnum_count(text) / max(1, len(text)) < self.min_alnum_fraction:
            return None, "alnum_fraction"
        head = "\n".join(lines[:5]).lower()
        if any(m in head for m in self.autogenerated_markers):
            return None, "autogenerated"
        return text, None


_LANGID = None


@dataclass
class Language:
    """langid.py with normalised probabilities. It reads the first `max_chars` characters (langid is
    linear in length and 2,000 characters identify a language; this keeps it near 2 MB/s per core)."""

    name: ClassVar[str] = "language"
    languages: tuple = ("en",)
    min_score: float = 0.65
    max_chars: int = 2_000

    def __call__(self, text: str) -> Result:
        global _LANGID
        if _LANGID is None:
            from langid.langid import LanguageIdentifier, model

            _LANGID = LanguageIdentifier.from_modelstring(model, norm_probs=True)
        lang, score = _LANGID.classify(text[: self.max_chars].replace("\n", " "))
        if lang not in self.languages:
            return None, f"not_{'_'.join(self.languages)}"
        if score < self.min_score:
            return None, "low_language_score"
        return text, None


FILTERS = {f.name: f for f in (Language, GopherRepetition, GopherQuality, C4Lines, FineWebQuality, Code)}
# FineWeb's order for web text; code has its own.
DEFAULT_CHAINS = {
    "text": ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb"),
    "html": ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb"),
    "code": ("code",),
}


def build_filter(name: str, **params):
    if name not in FILTERS:
        raise ValueError(f"unknown filter {name!r}: choose from {', '.join(FILTERS)}")
    cls = FILTERS[name]
    known = {f.name for f in fields(cls)}
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"filter {name} has no parameter {sorted(unknown)[0]!r}: it has {', '.join(sorted(known))}")
    return cls(**params)


# --- PII ---------------------------------------------------------------------------------------------
# Cheap candidate patterns (each begins with a character class, which `re` scans for quickly) find
# spans; the strict pattern and the context check decide. This keeps masking near 30 MB/s per core.
EMAIL = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b"
)
IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
IPV6 = re.compile(r"[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){7}")
PHONE_CANDIDATE = re.compile(r"[+(\d][\d ().+-]{8,20}\d")
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w)"  # (555) 123-4567
    r"|(?<![\w+])\+\d{1,3}(?:[ .-]\d{2,4}){2,4}(?!\w)"  # +44 20 7946 0958
)
PII_PLACEHOLDERS = {"email": "<EMAIL_ADDRESS>", "ip": "<IP_ADDRESS>", "phone": "<PHONE_NUMBER>"}


def _standalone(text: str, m: re.Match, joiners: str) -> bool:
    """The match is not part of a longer word or dotted/colon-joined run."""
    before = text[m.start() - 1] if m.start() else " "
    after = text[m.end()] if m.end() < len(text) else " "
    return not (before.isalnum() or before in joiners or after.isalnum() or after in joiners)


def mask_pii(text: str) -> tuple[str, Counter]:
    """Replaces e-mail addresses, public IP addresses (as FineWeb: private, loopback and documentation
    ranges are not personal) and phone numbers with placeholders. Returns the text and counts."""
    counts: Counter = Counter()

    def ip(m: re.Match, joiners: str) -> str:
        try:
            public = _standalone(m.string, m, joiners) and ipaddress.ip_address(m.group()).is_global
        except ValueError:  # 999.1.1.1 is not an address
            public = False
        counts["ip"] += public
        return PII_PLACEHOLDERS["ip"] if public else m.group()

    def phone(m: re.Match) -> str:
        if m.start() and (m.string[m.start() - 1].isalnum() or m.string[m.start() - 1] in "_."):
            return m.group()
        new, n = PHONE.subn(PII_PLACEHOLDERS["phone"], m.group())
        counts["phone"] += n
        return new

    def email(line: str) -> str:
        new, n = EMAIL.subn(PII_PLACEHOLDERS["email"], line)
        counts["email"] += n
        return new

    if "@" in text:
        text = "\n".join(email(line) if "@" in line else line for line in text.split("\n"))
    text = IPV4.sub(lambda m: ip(m, "._"), text)
    if text.count(":") >= 7:
        text = "\n".join(
            IPV6.sub(lambda m: ip(m, ":_"), line) if line.count(":") >= 7 else line for line in text.split("\n")
        )
    text = PHONE_CANDIDATE.sub(phone, text)
    return text, counts
