"""Reading YAML: every problem located by file, document, field path and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from aisemble.loading import ManifestError, load_paths, load_text

GOOD = """\
apiVersion: aisemble.io/v1alpha1
kind: AISemble
metadata:
  name: lab
spec:
  services:
    - name: web
      image: img
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_text(text, "s.yaml")
    return [str(p) for p in info.value.problems]


def test_a_valid_document_loads_with_its_position() -> None:
    loaded = load_text("---\n" + GOOD, "s.yaml")
    [doc] = loaded.documents
    assert (doc.source, doc.index, doc.line) == ("s.yaml", 1, 2)
    assert str(doc.key) == "default/lab"


def test_unknown_field_names_line_and_suggests_the_right_one() -> None:
    text = GOOD + "      replica: 2\n"
    assert problems(text) == [
        "s.yaml: document 1 (AISemble lab): spec.services[0].replica (line 9, column 7): "
        "unknown field 'replica'; did you mean 'replicas'?"
    ]


def test_spec_level_rules_point_at_the_offending_field() -> None:
    text = GOOD + "      dependsOn: [db]\n"
    [problem] = problems(text)
    assert "spec.services[0].dependsOn[0] (line 9" in problem
    assert "unknown service 'db'" in problem


def test_every_invalid_document_is_reported_at_once() -> None:
    bad = GOOD.replace("name: lab", "name: other").replace(
        "image: img", "image: img\n      replicas: -3"
    )
    text = GOOD.replace("name: web", "name: Web") + "---\n" + bad
    found = problems(text)
    assert len(found) == 2
    assert found[0].startswith("s.yaml: document 1 (AISemble lab): spec.services[0].name (line 7")
    assert found[1].startswith(
        "s.yaml: document 2 (AISemble other): spec.services[0].replicas (line 18"
    )


def test_yaml_syntax_errors_have_a_line() -> None:
    [problem] = problems(GOOD + "    - name: [oops\n")
    assert (
        problem.startswith("s.yaml: document 1")
        and "(line" in problem
        and "invalid YAML" in problem
    )


def test_duplicate_keys_are_errors_not_silently_overwritten() -> None:
    text = GOOD + "      image: other\n"
    assert any("duplicate key 'image'" in p and "line 9" in p for p in problems(text))


def test_other_kinds_are_skipped_not_rejected() -> None:
    pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n---\n"
    loaded = load_text(pod + GOOD, "s.yaml")
    assert [str(s) for s in loaded.skipped] == [
        "s.yaml: document 1: skipped Pod 'p' (not an AISemble)"
    ]
    assert [d.index for d in loaded.documents] == [2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: AISemble\nmetadata: {name: a}\n", "missing apiVersion"),
        (
            "apiVersion: aisemble.io/v1\nkind: AISemble\nmetadata: {name: a}\nspec: {}\n",
            "apiVersion aisemble.io/v1 is not served; use aisemble.io/v1alpha1",
        ),
        ("- a\n- b\n", "a document must be a mapping"),
        (GOOD.replace("metadata:\n  name: lab\n", ""), "metadata (line 1"),
    ],
)
def test_malformed_documents(text: str, expected: str) -> None:
    assert any(expected in p for p in problems(text))


def test_the_same_stack_twice_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yml").write_text(GOOD)
    with pytest.raises(ManifestError) as info:
        load_paths([tmp_path])
    assert "declared twice" in str(info.value) and "a.yaml" in str(info.value)


def test_directories_load_yaml_files_in_order_and_missing_paths_are_errors(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(GOOD.replace("lab", "b"))
    (tmp_path / "a.yml").write_text(GOOD.replace("lab", "a"))
    (tmp_path / "notes.txt").write_text("not yaml")
    assert [d.key.name for d in load_paths([tmp_path]).documents] == ["a", "b"]
    with pytest.raises(ManifestError, match="no such file"):
        load_paths([tmp_path / "missing.yaml"])
