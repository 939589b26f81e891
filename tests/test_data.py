"""Generator, non-IID sites and file loaders (each error names file, row/line and field)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedpeft.config import DataConfig
from fedpeft.data.loaders import DataLoadError, load_labelled_texts
from fedpeft.data.notes import LABELS, generate_notes, site_style
from fedpeft.data.sites import global_test_set, make_site, site_sizes, split_counts

LAB = ["cardiology", "neurology", "dermatology"]


def test_generator_is_deterministic_and_seed_sensitive():
    a = generate_notes(n=50, seed=1)
    assert a == generate_notes(n=50, seed=1)
    assert a != generate_notes(n=50, seed=2)
    assert len(set(a[1])) == len(LABELS)  # every class appears in a uniform mix of 50


def test_sites_are_non_iid_in_labels_quantity_and_style():
    # Prepare
    cfg = DataConfig(notes_per_site=150, dirichlet_alpha=0.3, quantity_skew=0.8, label_noise=0.0)
    sites = [make_site(s, 8, cfg, seed=0) for s in range(8)]
    counts = split_counts(sites)
    # Assert: label skew (class mixes differ a lot), quantity skew, and style (children's hospital wording)
    props = counts / counts.sum(axis=0, keepdims=True)
    assert np.abs(props[:, 0] - props[:, 3]).sum() > 0.3
    sizes = counts.sum(axis=0)
    assert sizes.max() > 2 * sizes.min()
    kids = " ".join(sites[2].train_texts)
    assert site_style(2).paediatric and "brought in by" in kids
    assert "brought in by" not in " ".join(sites[1].train_texts)
    cardio = LABELS.index("cardiology")
    assert props[cardio, 1] > props[cardio].mean()  # the cardiology centre sees more cardiology


def test_site_sizes_mean_and_floor():
    s = site_sizes(num_sites=1000, mean=100, sigma=0.5, seed=0)
    assert abs(s.mean() - 100) < 5 and s.min() >= 16
    assert (site_sizes(num_sites=4, mean=50, sigma=0.0, seed=0) == 50).all()


def test_global_test_set_is_balanced_and_clean():
    texts, labels = global_test_set(DataConfig(global_test_size=700), seed=0)
    counts = np.bincount(labels, minlength=len(LABELS))
    assert len(texts) == 700 and counts.min() > 60


def test_csv_and_jsonl_load_with_stable_label_ids(tmp_path):
    # Prepare: two sites listing labels in different orders
    (tmp_path / "a.csv").write_text("note,dx\nchest pain,cardiology\nrash,dermatology\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"note": "seizure", "dx": "neurology"}) + "\n"
                                      + json.dumps({"note": "angina", "dx": "cardiology"}) + "\n")
    # Execute
    ta, ya = load_labelled_texts(tmp_path / "a.csv", labels=LAB, text_column="note", label_column="dx")
    tb, yb = load_labelled_texts(tmp_path / "b.jsonl", labels=LAB, text_column="note", label_column="dx")
    # Assert
    assert ta == ["chest pain", "rash"] and ya == [0, 2]
    assert tb == ["seizure", "angina"] and yb == [1, 0]


def test_saved_datasets_folder_loads(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    feats = Features({"text": Value("string"), "label": ClassLabel(names=["dermatology", "cardiology"])})
    Dataset.from_dict({"text": ["rash", "cp"], "label": [0, 1]}, features=feats).save_to_disk(str(tmp_path / "ds"))
    texts, ys = load_labelled_texts(tmp_path / "ds", labels=LAB)
    assert texts == ["rash", "cp"] and ys == [2, 0]  # mapped by name, not by the file's own numbering


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.csv", "txt,label\nhello,cardiology\n", r"missing.csv: header: missing column 'text'"),
        ("empty.csv", "", r"empty.csv: file is empty"),
        ("bad.csv", b"text,label\nok,cardiology\n\xff\xfe,neurology\n", r"bad.csv: line 3: not UTF-8"),
        ("unknown.csv", "text,label\nhello,oncology\n", r"unknown.csv: row 2: field 'label': unknown label 'oncology'"),
        ("blank.csv", "text,label\nfine,cardiology\n  ,neurology\n", r"blank.csv: row 3: field 'text' is empty"),
        ("missing.jsonl", '{"text": "a", "label": "cardiology"}\n{"label": "neurology"}\n',
         r"missing.jsonl: line 2: missing field 'text'"),
        ("broken.jsonl", '{"text": "a", "label": "cardiology"}\n{oops\n', r"broken.jsonl: line 2: invalid JSON"),
        ("unknown.jsonl", '{"text": "a", "label": "x"}\n', r"unknown.jsonl: line 1: field 'label': unknown label 'x'"),
        ("empty.jsonl", "\n\n", r"empty.jsonl: file is empty"),
    ],
)
def test_loader_errors_name_file_row_and_field(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataLoadError, match=message):
        load_labelled_texts(path, labels=LAB)


def test_pooled_file_is_dirichlet_partitioned_without_leaking_the_server_test_set(tmp_path):
    # Prepare: one pooled CSV of generated notes
    import csv

    texts, ys = generate_notes(n=400, seed=5)
    with open(tmp_path / "pool.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows((f"{t} ref{i}", LABELS[y]) for i, (t, y) in enumerate(zip(texts, ys)))  # unique texts
    cfg = DataConfig(source=str(tmp_path / "pool.csv"), labels=",".join(LABELS), dirichlet_alpha=0.3)
    # Execute
    sites = [make_site(s, 4, cfg, seed=0) for s in range(4)]
    test_texts, _ = global_test_set(cfg, seed=0)
    # Assert: disjoint partitions covering the 90 % pool; server test set is the other 10 %
    site_texts = [t for s in sites for t in s.train_texts + s.test_texts]
    assert len(site_texts) == 360 and len(test_texts) == 40
    assert len(set(site_texts)) == 360 and not set(test_texts) & set(site_texts)
    counts = split_counts(sites)
    assert (counts.sum(axis=0) > 0).all()
    assert np.abs(counts[:, 0] / counts[:, 0].sum() - counts[:, 1] / counts[:, 1].sum()).sum() > 0.2


def test_simulated_nodes_play_the_largest_sites_first_and_every_site_once():
    from fedpeft.config import DataConfig
    from fedpeft.data.sites import make_site, simulated_site

    # Prepare: the default generator (log-normal site sizes) and one without quantity skew
    cfg, flat = DataConfig(notes_per_site=300), DataConfig(notes_per_site=300, quantity_skew=0.0)
    # Execute
    order = [simulated_site(i, 5, cfg, seed=0) for i in range(5)]
    sizes = [len(make_site(s, 5, cfg, seed=0).train_texts) for s in order]
    # Assert: a permutation of the sites, in non-increasing size (longest work dispatched first);
    # without size differences, or outside the federation, node i plays site i
    assert sorted(order) == list(range(5)) and order != list(range(5))
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert [simulated_site(i, 5, flat, seed=0) for i in range(5)] == list(range(5))
    assert simulated_site(7, 5, cfg, seed=0) == 7
