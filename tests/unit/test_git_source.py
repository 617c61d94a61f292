"""Git sources: the `git:URL[#REF][:PATH]` grammar, and syncs from a real local repository
into a real store (no podman): what is read, what is applied, what a bad commit does."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from git_helpers import GitRepo

from aisemble.loading import load_text
from aisemble.model import StackKey
from aisemble.planning.admission import Policy
from aisemble.sources.git import GitSource, GitSpec, GitSpecError, parse_spec
from aisemble.sources.specs import SourceSpecError, canonical_id, open_source
from aisemble.sources.store import Store

# -- the grammar ---------------------------------------------------------------------------

PARSED = [
    # (spec, url, ref, path)
    ("git:https://host/org/r.git", "https://host/org/r.git", "HEAD", ""),
    ("git:https://host:8443/r.git", "https://host:8443/r.git", "HEAD", ""),
    ("git:https://host:8443/r.git:stacks", "https://host:8443/r.git", "HEAD", "stacks"),
    (
        "git:https://host:8443/r.git#main:stacks/prod",
        "https://host:8443/r.git",
        "main",
        "stacks/prod",
    ),
    ("git:https://host:8443", "https://host:8443", "HEAD", ""),
    ("git:ssh://git@host:2222/org/r.git#v1.2:a:b", "ssh://git@host:2222/org/r.git", "v1.2", "a:b"),
    ("git:git@host:org/r.git", "git@host:org/r.git", "HEAD", ""),
    ("git:git@host:org/r.git:stacks", "git@host:org/r.git", "HEAD", "stacks"),
    ("git:git@host:org/r.git#release/2:stacks", "git@host:org/r.git", "release/2", "stacks"),
    ("git:user@[::1]:r.git:stacks", "user@[::1]:r.git", "HEAD", "stacks"),
    ("git:host:r.git", "host:r.git", "HEAD", ""),  # git's own rule: scp-style, not a path
    ("git:file:///srv/repo:stacks", "file:///srv/repo", "HEAD", "stacks"),
    ("git:/srv/repo", "/srv/repo", "HEAD", ""),
    ("git:/srv/repo:stacks", "/srv/repo", "HEAD", "stacks"),
    ("git:/srv/repo#main", "/srv/repo", "main", ""),
    ("git:/srv/repo#:stacks", "/srv/repo", "HEAD", "stacks"),  # an empty REF is HEAD
    ("git:/srv/repo#0123abcd:/stacks/./prod/", "/srv/repo", "0123abcd", "stacks/prod"),
]


@pytest.mark.parametrize(("text", "url", "ref", "path"), PARSED)
def test_specs_parse_and_their_id_parses_back(text: str, url: str, ref: str, path: str) -> None:
    spec = parse_spec(text)
    assert (spec.url, spec.ref, spec.path) == (url, ref, path)
    assert parse_spec(spec.id) == spec
    assert spec.id.startswith(f"git:{url}#{ref}")


def test_relative_local_paths_are_made_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_spec("git:./repo:stacks") == GitSpec(str(tmp_path / "repo"), "HEAD", "stacks")
    assert canonical_id("git:./repo") == f"git:{tmp_path / 'repo'}#HEAD"


REFUSED = [
    ("git:", "no URL"),
    ("git:#main", "no URL"),
    ("git:/srv/repo:stacks#main", "the PATH goes after the REF: git:/srv/repo#main:stacks"),
    ("git:https://me:token@host/r.git", "holds a password"),
    ("git:-oProxyCommand=x", "cannot start with '-'"),
    ("git:host:", "nothing after the host"),
    ("git:ext::sh -c x", "<transport>::<address>"),
    ("git:ftp://host/r.git", "unsupported scheme 'ftp'"),
    ("git:/srv/repo#bad..ref", "not a valid branch, tag or commit name"),
    ("git:/srv/repo#-x", "not a valid branch, tag or commit name"),
    ("git:/srv/repo#main:../etc", "must stay inside the repository"),
    ("git:/srv/my repo", "no spaces"),
    ("/srv/repo", "does not start with git:"),
]


@pytest.mark.parametrize(("text", "why"), REFUSED)
def test_specs_that_cannot_be_parsed_say_why(text: str, why: str) -> None:
    with pytest.raises(GitSpecError, match=None) as caught:
        parse_spec(text)
    assert why in str(caught.value)


def test_a_bad_source_names_the_grammar(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    try:
        with pytest.raises(SourceSpecError, match=r"the form is git:URL\[#REF\]\[:PATH\]"):
            open_source("git:", store)
        with pytest.raises(SourceSpecError, match="for a git repository write git:https://h/r.git"):
            open_source("https://h/r.git", store)
    finally:
        store.close()


# -- syncing from a real repository --------------------------------------------------------


def stack(name: str, *services: str, **metadata) -> dict:
    return {
        "apiVersion": "aisemble.io/v1alpha1",
        "kind": "AISemble",
        "metadata": {"name": name, **metadata},
        "spec": {"services": [{"name": s, "image": "img"} for s in services or ("web",)]},
    }


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    return GitRepo(tmp_path / "repo")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


def source(repo: GitRepo, store: Store, spec: str = "#main:stacks", **kwargs) -> GitSource:
    return ungoverned(GitSource(parse_spec(f"git:{repo.path}{spec}"), store, **kwargs))


def ungoverned(source: GitSource) -> GitSource:
    """These tests are about syncing, with made-up images: no admission policy (its own
    tests are in test_admission.py)."""
    source.admission = Policy(governed=())
    return source


def names(store: Store, source_id: str) -> list[str]:
    return [s.key.name for s in store.list(source=source_id, include_deleting=False)]


class TestSync:
    def test_a_commit_is_applied_and_recorded_and_an_unchanged_one_is_not_read(
        self, repo: GitRepo, store: Store, monkeypatch
    ) -> None:
        repo.write("stacks/a.yaml", stack("a"))
        first = repo.commit()
        git = source(repo, store)
        outcome = git.sync()
        assert outcome.error is None and outcome.revision == first
        assert [(c.key.name, c.verb) for c in outcome.changes] == [("a", "created")]
        record = store.source_sync(git.id)
        assert record.revision == first and record.error is None
        assert store.get(StackKey("default", "a")).source == f"git:{repo.path}#main:stacks"

        monkeypatch.setattr(git, "load", lambda _: pytest.fail("an applied commit was read"))
        assert git.sync().changes == []

    def test_folders_are_read_recursively_skipping_hidden_and_other_files(
        self, repo: GitRepo, store: Store
    ) -> None:
        repo.write("stacks/a.yaml", stack("a"))
        repo.write("stacks/team/b.yml", stack("b"))
        repo.write_text(".github/workflows/ci.yml", "on: push\n")  # not a manifest
        repo.write_text("stacks/.hidden/c.yaml", "not: a manifest\n")
        repo.write_text("stacks/README.md", "# stacks\n")
        repo.write("elsewhere/d.yaml", stack("d"))
        os.symlink("a.yaml", repo.path / "stacks" / "link.yaml")
        repo.commit()
        git = source(repo, store)
        assert git.sync().error is None
        assert names(store, git.id) == ["a", "b"]
        assert git.notes == [
            "stacks/link.yaml: a symbolic link, not followed (commit the file itself)"
        ]

    def test_path_may_name_one_file_and_defaults_to_the_root(
        self, repo: GitRepo, store: Store
    ) -> None:
        repo.write("stacks/a.yaml", stack("a"))
        repo.write("stacks/b.yaml", stack("b"))
        repo.commit()
        one = source(repo, store, "#main:stacks/b.yaml")
        assert one.sync().error is None and names(store, one.id) == ["b"]
        other = GitRepo(repo.path.parent / "other")
        other.write("x.yaml", stack("x"))
        other.commit()
        root = ungoverned(GitSource(parse_spec(f"git:{other.path}"), store))
        assert root.sync().error is None and names(store, root.id) == ["x"]

    def test_refs_resolve_to_branches_tags_commits_and_the_default_branch(
        self, repo: GitRepo, store: Store
    ) -> None:
        repo.write("stacks/a.yaml", stack("a", "v1"))
        first = repo.commit()
        repo.git("tag", "-a", "-m", "release", "v1")
        repo.write("stacks/a.yaml", stack("a", "v2"))
        second = repo.commit()
        repo.git("checkout", "--quiet", "-b", "feature")
        repo.write("stacks/a.yaml", stack("a", "v3"))
        third = repo.commit()
        repo.git("checkout", "--quiet", "main")
        for ref, commit in [
            ("v1", first),
            ("main", second),
            ("feature", third),
            ("HEAD", second),
            (first, first),
            (third[:10], third),
        ]:
            outcome = ungoverned(
                GitSource(parse_spec(f"git:{repo.path}#{ref}:stacks"), store)
            ).sync()
            assert outcome.revision == commit, ref
        unknown = ungoverned(GitSource(parse_spec(f"git:{repo.path}#nope:stacks"), store)).sync()
        assert "has no branch, tag or commit named 'nope'" in unknown.error

    def test_a_bad_commit_changes_nothing_and_says_where_until_fixed(
        self, repo: GitRepo, store: Store
    ) -> None:
        repo.write("stacks/a.yaml", stack("a"))
        good = repo.commit()
        git = source(repo, store)
        git.sync()
        repo.write("stacks/a.yaml", stack("a", "web", "extra"))  # a valid change ...
        repo.write_text(  # ... and a broken file: neither applies
            "stacks/b.yaml",
            "apiVersion: aisemble.io/v1alpha1\nkind: AISemble\nmetadata: {name: b}\n"
            "spec:\n  services:\n    - name: web\n      imagee: img\n",
        )
        bad = repo.commit()
        outcome = git.sync()
        assert outcome.changes == [] and outcome.revision == bad
        assert f"commit {bad[:12]}: 2 problem(s), nothing applied" in outcome.error
        assert f"(commit {good[:12]} stays applied)" in outcome.error
        assert (
            "stacks/b.yaml: document 1 (AISemble b): spec.services[0].imagee (line 7"
            in outcome.error
        )
        assert len(store.get(StackKey("default", "a")).resource.spec.services) == 1
        record = store.source_sync(git.id)
        assert record.revision == good and record.error == outcome.error
        assert record.error_revision == bad

        assert git.sync().error == outcome.error  # the same commit: not read again
        repo.remove("stacks/b.yaml")
        repo.commit()
        assert git.sync().error is None
        assert len(store.get(StackKey("default", "a")).resource.spec.services) == 2
        assert store.source_sync(git.id).error is None

    def test_a_path_missing_from_the_commit_or_an_unreachable_repo_deletes_nothing(
        self, repo: GitRepo, store: Store
    ) -> None:
        repo.write("stacks/a.yaml", stack("a"))
        repo.commit()
        git = source(repo, store)
        git.sync()
        repo.git("mv", "stacks", "moved")
        moved = repo.commit()
        outcome = git.sync()
        assert f"stacks: no such folder or file in commit {moved[:12]}" in outcome.error
        assert names(store, git.id) == ["a"]
        gone = ungoverned(
            GitSource(parse_spec(f"git:{repo.path.parent / 'nope'}#main"), store)
        ).sync()
        assert "git fetch" in gone.error and "check the URL" in gone.error

    def test_removed_files_prune_their_stacks_unless_prune_is_off(
        self, repo: GitRepo, store: Store
    ) -> None:
        repo.write("stacks/a.yaml", stack("a"))
        repo.write("stacks/b.yaml", stack("b"))
        repo.commit()
        keep = source(repo, store, prune=False)
        keep.sync()
        repo.remove("stacks/b.yaml")
        repo.commit()
        assert [(c.key.name, c.verb) for c in keep.sync().changes] == [("a", "unchanged")]
        assert names(store, keep.id) == ["a", "b"]
        pruning = source(repo, store)
        outcome = pruning.sync()  # same commit, other prune setting: applied again
        assert [(c.key.name, c.verb) for c in outcome.changes] == [
            ("a", "unchanged"),
            ("b", "deleted"),
        ]
        assert store.get(StackKey("default", "b")).deleting

    def test_a_stack_of_another_source_is_a_conflict_for_that_stack_alone(
        self, repo: GitRepo, store: Store
    ) -> None:
        store.apply(load_text(yaml.safe_dump(stack("mine", "cli")), "mine.yaml").documents)
        repo.write("stacks/mine.yaml", stack("mine", "git"))
        repo.write("stacks/b.yaml", stack("b"))
        repo.commit()
        git = source(repo, store)
        outcome = git.sync()
        assert outcome.error is None
        assert [(c.key.name, c.verb) for c in outcome.changes] == [
            ("b", "created"),
            ("mine", "conflict"),
        ]
        assert "managed by cli" in outcome.conflicts[0].message
        mine = store.get(StackKey("default", "mine"))
        assert mine.source == "cli" and mine.resource.spec.services[0].name == "cli"
        [event] = [
            e for e in store.events(StackKey("default", "mine")) if e.reason == "SyncConflict"
        ]
        assert event.type == "Warning"
        git.sync()  # the same conflict again is not a new event
        assert len([e for e in store.events() if e.reason == "SyncConflict"]) == 1

        store.request_delete([StackKey("default", "mine")])  # freed: the same commit applies
        outcome = git.sync()
        assert ("mine", "created") in [(c.key.name, c.verb) for c in outcome.changes]
        assert store.get(StackKey("default", "mine")).source == git.id

    def test_one_sync_of_a_source_at_a_time(self, repo: GitRepo, store: Store) -> None:
        repo.write("stacks/a.yaml", stack("a"))
        repo.commit()
        git = source(repo, store)
        with store.source_lock(git.id) as held:  # as another process (`aisemble sync`) would
            assert held
            outcome = git.sync(lock_timeout=0.2)
        assert outcome.busy and "another process is syncing" in outcome.error
        assert store.list() == []
        assert git.sync().changes[0].verb == "created"


class TestEmptiedFiles:
    """A commit is atomic, so a removed file prunes; a file emptied by mistake does not."""

    def test_a_file_emptied_by_a_commit_keeps_its_stacks_and_a_removed_one_prunes(
        self, repo: GitRepo, store: Store, caplog
    ) -> None:
        repo.write("stacks/a.yaml", stack("a1"), stack("a2"))
        repo.write("stacks/b.yaml", stack("b"))
        repo.write("stacks/c.yaml", stack("c"))
        repo.commit()
        source(repo, store).sync()
        repo.write_text("stacks/a.yaml", "# emptied by mistake\n")
        repo.remove("stacks/b.yaml")
        emptied = repo.commit()
        git = source(repo, store)  # a new process: it reads what the applied commit declared
        with caplog.at_level("WARNING", logger="aisemble.sources"):
            outcome = git.sync()
        assert sorted((c.key.name, c.verb) for c in outcome.changes) == [
            ("a1", "unchanged"),
            ("a2", "unchanged"),
            ("b", "deleted"),
            ("c", "unchanged"),
        ]
        assert names(store, git.id) == ["a1", "a2", "c"]
        assert f"commit {emptied[:12]}: stacks/a.yaml: it holds no documents" in outcome.error
        assert "default/a1, default/a2 stay as they were" in outcome.error
        warned = [r.getMessage() for r in caplog.records]
        assert (
            f"{git.id}: stack default/b deleted: no file declares it now "
            "(it came from stacks/b.yaml)" in warned
        )
        record = store.source_sync(git.id)
        assert record.revision == emptied and record.error == outcome.error

        assert git.sync().error == outcome.error  # the same commit: still reported
        assert store.source_sync(git.id).error == outcome.error
        repo.remove("stacks/a.yaml")  # removed on purpose: now they go
        repo.commit()
        outcome = git.sync()
        assert outcome.error is None and names(store, git.id) == ["c"]
        assert store.source_sync(git.id).error is None
