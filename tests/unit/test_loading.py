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


BROKEN = """\
apiVersion: aisemble.io/v1alpha1
kind: AISemble
metadata:
  name: lab
spec:
  services:
    - name: web
      image: img
      replicas: -1
      dependsOn: [api]
      volumeMounts:
        - {volume: cache, mountPath: /c}
    - name: api
      image: img
      dependsOn: [web]
  expose:
    - {service: ghost, hostPort: 8080}
"""


def test_a_schema_error_does_not_hide_the_other_problems_of_its_document() -> None:
    found = problems(BROKEN)
    where = "s.yaml: document 1 (AISemble lab): "
    assert found == [
        where + "spec.services[0].replicas (line 9, column 7): "
        "Input should be greater than or equal to 0",
        where + "spec.services[0].volumeMounts[0].volume (line 12, column 12): "
        "unknown volume 'cache'; spec.volumes has: none declared",
        where
        + "spec.services[1].dependsOn (line 15, column 7): dependency cycle: api -> web -> api",
        where + "spec.expose[0].service (line 17, column 8): unknown service 'ghost'",
    ]


def test_every_cross_field_problem_of_a_valid_schema_is_reported() -> None:
    text = BROKEN.replace("      replicas: -1\n", "")
    assert [p.split(": ")[2].split(" (")[0] for p in problems(text)] == [
        "spec.services[0].volumeMounts[0].volume",
        "spec.services[1].dependsOn",
        "spec.expose[0].service",
    ]


def test_a_problem_inside_a_broken_field_is_reported_once() -> None:
    text = GOOD.replace("image: img", "image: img\n      dependsOn: [Web_1]")
    [problem] = problems(text)
    assert "spec.services[0].dependsOn[0] (line 9" in problem and "pattern" in problem


def test_unknown_references_are_not_guessed_when_a_name_is_malformed() -> None:
    text = GOOD.replace("image: img", "image: img\n      dependsOn: [db]") + "    - image: x\n"
    found = problems(text)
    assert any("spec.services[1].name" in p and "required" in p for p in found)
    assert not any("unknown service" in p for p in found)


def test_a_wrong_api_version_does_not_hide_field_errors() -> None:
    text = GOOD.replace("v1alpha1", "v1").replace("image: img", "image: img\n      replicas: x")
    found = problems(text)
    assert any("apiVersion (line 1" in p and "not served" in p for p in found)
    assert any("spec.services[0].replicas (line 9" in p for p in found)
    assert len(found) == 2


def test_stacks_and_host_ports_are_checked_across_documents_even_broken_ones() -> None:
    exposed = GOOD + "      port: 80\n  expose:\n    - {service: web, hostPort: 8080}\n"
    broken = exposed.replace("name: lab", "name: other").replace("image: img", "image: 5")
    twice = GOOD.replace("image: img", "image: img\n      replicas: x")
    found = problems(exposed + "---\n" + broken + "---\n" + twice)
    assert found[0].startswith("s.yaml: document 2 (AISemble other): spec.services[0].image")
    assert found[1] == (
        "s.yaml: document 2 (AISemble other): spec.expose[0].hostPort (line 23, column 22): "
        "host port 8080/tcp on 127.0.0.1 is already claimed by s.yaml document 1 "
        "(AISemble default/lab), spec.expose[0].hostPort (line 11)"
    )
    assert any(
        p.startswith("s.yaml: document 3 (AISemble lab): spec.services[0].replicas") for p in found
    )
    assert any(
        "document 3" in p and "default/lab is declared twice; first at s.yaml document 1" in p
        for p in found
    )


def test_the_default_security_profile_is_checked_beside_schema_errors() -> None:
    text = GOOD.replace(
        "image: img", "image: img\n      replicas: x\n      securityContext: {runAsUser: 0}"
    )
    found = problems(text)
    assert len(found) == 2 and "spec.services[0].replicas (line 9" in found[0]
    assert "spec.services[0].securityContext.runAsUser (line 10" in found[1]
    assert "not allowed under security profile 'restricted'" in found[1]
