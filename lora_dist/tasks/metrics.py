"""Text metrics shared by the generation tasks: BLEU, NIST, ROUGE, CIDEr-D, and label accuracy.

How close each is to what the LoRA paper reports:

- BLEU: sacrebleu's corpus BLEU with its default 13a tokenization and all references of a
  segment. The E2E challenge's scripts use a Python port of mteval-v13a (same tokenization and
  formula), so numbers should agree to rounding on the same text. Case-sensitive: the LoRA
  repository's evaluation wrapper can lowercase everything first; lowercase inputs to match.
- NIST: NLTK's `corpus_nist` (a port of mteval-v13a's NIST, n=5) over 13a-tokenized text.
  Approximate: same formula and tokenization, but NLTK's own edge cases; checked here only
  against a hand-computed case, not against mteval.
- ROUGE-L (E2E): rouge-score's ROUGE-L F1, best over the references, averaged over segments.
  Approximate: the E2E scripts use coco-caption's ROUGE-L (F with beta=1.2, max precision and
  max recall taken separately over the references).
- ROUGE-1/2/L (SAMSum): rouge-score F1 with the Porter stemmer, averaged over examples; the
  usual way SAMSum numbers are reported. ROUGE-L here is sentence-level `rougeL`, not `rougeLsum`.
- CIDEr-D: implemented here from Vedantam et al. (2015) as coco-caption defines it (n=1..4,
  document frequencies from the references of the whole corpus, sigma=6, clipping, x10). It
  matches coco-caption (pycocoevalcap 1.2) exactly on pre-tokenized text. Approximate only in
  tokenization: coco-caption's pipeline uses the Stanford PTB tokenizer (Java); we lowercase
  and use 13a.
- METEOR: not available. NLTK's METEOR needs the WordNet corpus, which cannot be downloaded
  here, and the official METEOR 1.5 is a Java jar that is not installable from PyPI.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import sacrebleu
from nltk.translate.nist_score import corpus_nist as _nltk_corpus_nist
from rouge_score import rouge_scorer
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

_TOKENIZE_13A = Tokenizer13a()


def _check_lengths(predictions: Sequence[str], references: Sequence[object]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    if not predictions:
        raise ValueError("no predictions to score")


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) where segment i may have any number (>= 1) of references."""
    _check_lengths(predictions, references)
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference")
    width = max(len(refs) for refs in references)
    # sacrebleu takes one stream per reference slot; None marks a segment with fewer references.
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def corpus_nist(
    predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 5
) -> float:
    """Corpus NIST (mteval-v13a's formula via NLTK) over 13a-tokenized text."""
    _check_lengths(predictions, references)
    hyps = [_TOKENIZE_13A(p).split() for p in predictions]
    refs = [[_TOKENIZE_13A(r).split() for r in group] for group in references]
    return float(_nltk_corpus_nist(refs, hyps, n=n))


def rouge_l_multi(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over segments of the best ROUGE-L F1 against any reference, x100."""
    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    best = [
        scorer.score_multi(list(r), p)["rougeL"].fmeasure
        for p, r in zip(predictions, references, strict=True)
    ]
    return 100.0 * sum(best) / len(best)


def rouge_f1(
    predictions: Sequence[str],
    references: Sequence[str],
    types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
) -> dict[str, float]:
    """Mean ROUGE F1 per type over examples, x100, with the Porter stemmer (one reference each)."""
    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # rouge-score takes (target, prediction)
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: 100.0 * v / len(predictions) for t, v in totals.items()}


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_cider_d(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    max_n: int = 4,
    sigma: float = 6.0,
) -> float:
    """CIDEr-D over the corpus (coco-caption's definition, typically 0-10 for good systems).

    For each n, hypothesis and references become tf-idf vectors of n-grams, with document
    frequency counted over the reference sets of the corpus. The similarity is the clipped dot
    product over the norms times a Gaussian penalty on the length difference, averaged over the
    references; CIDEr-D is 10 times the mean over n and over segments.
    """
    _check_lengths(predictions, references)
    tok = [_TOKENIZE_13A(p.lower()).split() for p in predictions]
    refs_tok = [[_TOKENIZE_13A(r.lower()).split() for r in group] for group in references]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for group in refs_tok:
        doc_freq.update({g for r in group for n in range(1, max_n + 1) for g in _ngrams(r, n)})
    log_docs = math.log(float(len(references)))

    def vectors(tokens: list[str]) -> list[tuple[dict[tuple[str, ...], float], float]]:
        """Per n: tf-idf vector and its norm. Term frequency is the raw n-gram count."""
        out = []
        for n in range(1, max_n + 1):
            vec = {
                g: c * (log_docs - math.log(max(1.0, float(doc_freq[g]))))
                for g, c in _ngrams(tokens, n).items()
            }
            out.append((vec, math.sqrt(sum(v * v for v in vec.values()))))
        return out

    total = 0.0
    for hyp, group in zip(tok, refs_tok, strict=True):
        hyp_vecs = vectors(hyp)
        per_n = [0.0] * max_n
        for ref in group:
            # coco-caption measures length in bigrams; only differs from tokens for empty text.
            delta = float(max(len(hyp) - 1, 0) - max(len(ref) - 1, 0))
            penalty = math.exp(-(delta**2) / (2 * sigma**2))
            for n, ((hv, hnorm), (rv, rnorm)) in enumerate(
                zip(hyp_vecs, vectors(ref), strict=True)
            ):
                # Clipping: a hypothesis n-gram earns at most the reference's weight for it.
                dot = sum(min(w, rv[g]) * rv[g] for g, w in hv.items() if g in rv)
                if hnorm and rnorm:
                    per_n[n] += penalty * dot / (hnorm * rnorm)
        total += 10.0 * sum(s / len(group) for s in per_n) / max_n
    return total / len(predictions)


def normalize_label(text: str) -> str:
    """A generated class label: first word, lowercased, trailing punctuation dropped."""
    words = text.strip().lower().split()
    return words[0].strip(".,;:!?\"'") if words else ""


def accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Fraction of `normalize_label(prediction) == label`."""
    _check_lengths(predictions, labels)
    hits = sum(normalize_label(p) == g for p, g in zip(predictions, labels, strict=True))
    return hits / len(labels)
