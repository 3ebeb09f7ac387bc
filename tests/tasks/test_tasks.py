"""E2E, SAMSum and MNLI: loading the shipped samples, error reporting, and known-answer metrics."""

from __future__ import annotations

import csv
import importlib.util
import shutil
from pathlib import Path

import pytest

from lora_dist.tasks import get_task, metrics
from lora_dist.tasks.e2e import group_by_mr

ROOT = Path(__file__).resolve().parents[2]
TASK_FILES = {
    "e2e": ["trainset.csv", "devset.csv", "testset_w_refs.csv"],
    "samsum": ["train.json", "val.json", "test.json"],
    "mnli": ["train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"],
}


def load_generator():  # the script is not a package module; import it by path
    spec = importlib.util.spec_from_file_location(
        "make_task_samples", ROOT / "scripts" / "make_task_samples.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- loading the shipped samples ---


@pytest.mark.parametrize("name", sorted(TASK_FILES))
def test_sample_splits_load_with_prompts_and_targets(name: str) -> None:
    task = get_task(name)
    assert task.name == name
    for split in ("train", "dev"):
        ds = task.load_split(task.sample_dir(), split)
        assert 20 <= len(ds) <= 150
        for row in ds:
            assert task.prompt(row).strip() and task.target(row).strip()


def test_e2e_rows_carry_every_reference_of_their_mr() -> None:
    task = get_task("e2e")
    ds = task.load_split(task.sample_dir(), "test")
    by_mr: dict[str, list[str]] = {}
    for row in ds:
        by_mr.setdefault(row["mr"], []).append(row["ref"])
    assert max(len(refs) for refs in by_mr.values()) >= 2  # the sample really is multi-reference
    for row in ds:
        assert row["references"] == by_mr[row["mr"]]
        assert row["mr"] in task.prompt(row) and task.target(row) == row["ref"]


def test_samsum_keeps_release_line_breaks() -> None:
    task = get_task("samsum")
    row = task.load_split(task.sample_dir(), "dev")[0]
    assert "\r\n" in row["dialogue"]
    assert "\r" not in task.prompt(row) and row["dialogue"].split("\r\n")[0] in task.prompt(row)


def test_mnli_reads_quotes_literally(tmp_path: Path) -> None:
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    # A field opening with an unbalanced quote: a quoting reader would swallow the next line.
    line = '0\t7\t7e\tfiction\t"No, he said.\tHe spoke.\tentailment\tentailment\n'
    (tmp_path / "train.tsv").write_text(header + line + line.replace("0\t7", "1\t8"))
    ds = get_task("mnli").load_split(tmp_path, "train")
    assert ds["sentence1"] == ['"No, he said.'] * 2 and ds["index"] == ["0", "1"]
    sample = get_task("mnli").load_split(get_task("mnli").sample_dir(), "dev")
    assert set(sample["gold_label"]) == {"entailment", "neutral", "contradiction"}
    assert any('"' in s for s in sample["sentence1"])  # the sample exercises quotes too


# --- errors name the file and the line or row ---


def copy_sample(name: str, tmp_path: Path) -> Path:
    shutil.copytree(get_task(name).sample_dir(), tmp_path / name)
    return tmp_path / name


def test_e2e_missing_field_names_file_and_line(tmp_path: Path) -> None:
    data = copy_sample("e2e", tmp_path)
    path = data / "devset.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    mr = next(csv.reader([lines[3]]))[0]
    lines[3] = f'"{mr}"\n'  # the record keeps its MR and loses its ref
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"devset\.csv:4: expected 2 fields, found 1"):
        get_task("e2e").load_split(data, "dev")


def test_e2e_empty_ref_names_line(tmp_path: Path) -> None:
    (tmp_path / "trainset.csv").write_text('mr,ref\n"name[A]","A."\n"name[B]",\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"trainset\.csv:3: field 'ref' is empty"):
        get_task("e2e").load_split(tmp_path, "train")


def test_samsum_missing_field_names_file_and_row(tmp_path: Path) -> None:
    data = copy_sample("samsum", tmp_path)
    text = (data / "val.json").read_text()
    first_summary = text.index('"summary"')
    cut = text.index("\n", first_summary) + 1
    (data / "val.json").write_text(text[:first_summary] + text[cut:])
    with pytest.raises(ValueError, match=r"val\.json: row 0 .*'summary'"):
        get_task("samsum").load_split(data, "dev")


def test_mnli_missing_field_names_file_and_line(tmp_path: Path) -> None:
    data = copy_sample("mnli", tmp_path)
    path = data / "dev_matched.tsv"
    lines = path.read_text().splitlines(keepends=True)
    lines[5] = lines[5].rsplit("\t", 1)[0] + "\n"  # drop gold_label
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"dev_matched\.tsv:6: expected 16 fields, found 15"):
        get_task("mnli").load_split(data, "dev")


@pytest.mark.parametrize("name", sorted(TASK_FILES))
def test_missing_file_and_unknown_split(name: str, tmp_path: Path) -> None:
    task = get_task(name)
    with pytest.raises(ValueError, match=TASK_FILES[name][0].replace(".", r"\.")):
        task.load_split(tmp_path, "train")
    with pytest.raises(ValueError, match="no split"):
        task.load_split(task.sample_dir(), "nonsense")


# --- metrics: known answers ---


def test_e2e_identical_predictions_score_perfectly() -> None:
    task = get_task("e2e")
    rows = list(task.load_split(task.sample_dir(), "dev"))
    scores = task.score([r["ref"] for r in rows], rows, task.sample_dir())
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["rouge_l"] == pytest.approx(100.0)
    assert scores["n_mrs"] == len({r["mr"] for r in rows})


def test_multi_reference_bleu_uses_every_reference() -> None:
    refs = [["the cat sat on the mat today", "a small dog slept on the warm rug"]]
    assert metrics.corpus_bleu([refs[0][1]], refs) == pytest.approx(100.0)
    assert metrics.corpus_bleu([refs[0][1]], [refs[0][:1]]) < 20.0
    rows = [{"mr": "name[X]", "ref": r} for r in refs[0]]  # rows without a references column
    preds, grouped = group_by_mr([refs[0][1], "ignored: the first prediction per MR counts"], rows)
    assert preds == [refs[0][1]] and grouped == refs
    assert get_task("e2e").score([refs[0][1]] * 2, rows, Path("."))["bleu"] == pytest.approx(100.0)


def test_nist_known_answer() -> None:
    # Hypothesis = the single reference, 8 words, "the" twice (Doddington 2002's information
    # weights, info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)), counts over references).
    # Unigrams: "the" log2(8/2) = 2 (twice), six others log2(8/1) = 3: (2*2 + 6*3) / 8 words.
    # Bigrams: "the eagle" and "the river" log2(2/1) = 1, the other five 0: 2 / 7 bigrams.
    # Trigrams and up: every (n-1)-gram occurs once, so 0. Brevity penalty 1.
    sentence = "the eagle serves french food near the river"
    assert metrics.corpus_nist([sentence], [[sentence]]) == pytest.approx(22 / 8 + 2 / 7)


def test_cider_d_matches_coco_caption() -> None:
    refs = [
        ["the eagle is a coffee shop", "a coffee shop called the eagle"],
        ["burger king is cheap", "cheap food at burger king", "burger king serves cheap food"],
        ["french food in the city centre"],
    ]
    hyps = ["the eagle is a coffee shop", "burger king has cheap food", "city centre food"]
    # Computed with pycocoevalcap 1.2 (coco-caption's CIDEr-D): Cider().compute_score(...)[0].
    assert metrics.corpus_cider_d(hyps, refs) == pytest.approx(4.147593091581643, rel=1e-12)


def test_samsum_rouge_known_answers() -> None:
    task = get_task("samsum")
    rows = list(task.load_split(task.sample_dir(), "dev"))
    perfect = task.score([r["summary"] for r in rows], rows, task.sample_dir())
    assert perfect["rouge1"] == perfect["rouge2"] == perfect["rougeL"] == pytest.approx(100.0)
    # Hand count: prediction "amanda baked cookies" vs reference "amanda baked the cookies".
    # Unigrams: 3 shared, P=3/3, R=3/4, F1=6/7. Bigrams: "amanda baked" shared, P=1/2, R=1/3,
    # F1=2/5. LCS = 3 words, same as unigrams. Stemming maps "baked"/"bakes" together.
    row = {"summary": "Amanda baked the cookies.", "id": "1", "dialogue": "x"}
    scores = task.score(["Amanda bakes cookies"], [row], Path("."))
    assert scores["rouge1"] == pytest.approx(100 * 6 / 7)
    assert scores["rouge2"] == pytest.approx(100 * 2 / 5)
    assert scores["rougeL"] == pytest.approx(100 * 6 / 7)


def test_mnli_accuracy_hand_computed() -> None:
    rows = [{"gold_label": g} for g in ("entailment", "neutral", "contradiction", "neutral")]
    predictions = [" Entailment.", "neutral because the premise", "entailment", "NEUTRAL"]
    # Normalised: entailment, neutral, entailment, neutral -> 3 of 4 right.
    assert get_task("mnli").score(predictions, rows, Path("."))["accuracy"] == pytest.approx(75.0)
    assert metrics.normalize_label("  Contradiction!\nmore") == "contradiction"


# --- the sample generator is deterministic and produced the committed files ---


def test_generator_is_byte_identical_and_matches_committed(tmp_path: Path) -> None:
    generator = load_generator()
    first = generator.write_samples(tmp_path / "a", seed=0)
    second = generator.write_samples(tmp_path / "b", seed=0)
    assert len(first) == sum(len(files) for files in TASK_FILES.values())
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()
        committed = ROOT / "lora_dist" / "assets" / a.relative_to(tmp_path / "a")
        assert a.read_bytes() == committed.read_bytes(), f"{committed} is stale: rerun the script"
    other = generator.write_samples(tmp_path / "c", seed=1)
    assert first[0].read_bytes() != other[0].read_bytes()
