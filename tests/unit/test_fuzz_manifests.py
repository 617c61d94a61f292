"""Any manifest text loads to valid resources or fails with a located ManifestError.

Hypothesis feeds the loader what `aisemble apply -f` and `aisemble diff` read with
(`load_text`, `load_paths`) and what the kube source validates with (`load_object`):
random text, YAML token soup, random documents of every shape, alias bombs, and
mutations of the reference manifests, of their data and of their text. What comes out
must be resources or a ManifestError each of whose problems names its file and its line
or field; any other exception, or a hang, is a bug. What loads must survive what apply
and diff do next: the store's checks (a StoreError at most), the round trip through
`to_document` and YAML to an equal resource, and the diff's rendering.

CI runs AISEMBLE_FUZZ_EXAMPLES (default 300) examples per property, derandomized, so a
run is repeatable; set it higher to look further (AISEMBLE_FUZZ_EXAMPLES=5000).
"""

from __future__ import annotations

import copy
import os
import signal
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aisemble.cli.apply import _comparable  # what `aisemble diff` prints of a resource
from aisemble.loading import (
    Document,
    ManifestError,
    Manifests,
    load_object,
    load_paths,
    load_text,
)
from aisemble.model import API_VERSION, AISemble
from aisemble.model.checks import find_cycle
from aisemble.model.secret import Secret
from aisemble.parsing import MAX_ALIASED_NODES, MAX_DEPTH
from aisemble.sources.store import Store, StoreError

EXAMPLES = int(os.environ.get("AISEMBLE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)
SOURCE = "fuzz.yaml"
HANG_SECONDS = 20  # one input, loaded and checked; the slowest takes well under a second

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_FILES = sorted([*ROOT.glob("manifests/*.yaml"), *ROOT.glob("manifests/operator/*.yaml")])

# Nearly every field the model has, in one valid stack (the reference manifests use few).
KITCHEN_SINK = """\
apiVersion: aisemble.io/v1alpha1
kind: AISemble
metadata:
  name: sink
  namespace: lab
  labels: {team: ml}
  annotations: {aisemble.io/suspend: "false"}
  uid: 0b1c2d3e
  managedFields: [{manager: kubectl, fieldsV1: {f:spec: {}}}]
spec:
  nodeSelector: {gpu: "yes"}
  security: {profile: baseline, pidsLimit: 2048}
  network: {egress: true}
  progressDeadlineSeconds: 300
  rollback: auto
  volumes: [{name: models}, {name: cache}]
  services:
    - name: llm
      image: localhost/aisemble/llm:latest
      command: [python, -m, llm]
      args: [--port, "8000"]
      port: 8000
      replicas: 2
      env:
        - {name: LOG_LEVEL, value: info}
        - name: API_KEY
          valueFrom: {secretKeyRef: {name: llm-keys, key: api-key}}
      resources:
        cpus: 1500m
        memory: 8Gi
        gpus: 1
        gpuKind: nvidia.com/gpu
        gpuMinMemory: 16Gi
        gpuSharing: shared
        gpuMaxHolders: 2
      volumeMounts: [{volume: models, mountPath: /models, readOnly: true}]
      readinessProbe:
        httpGet:
          path: /ready
          port: 8000
          scheme: HTTP
          httpHeaders: [{name: X-Probe, value: "1"}]
        periodSeconds: 5
        successThreshold: 2
      livenessProbe: {tcpSocket: {}, failureThreshold: 5}
      startupProbe: {exec: {command: [cat, /tmp/ready]}, initialDelaySeconds: 10}
      minReadySeconds: 3
      terminationGracePeriodSeconds: 30
      securityContext:
        runAsUser: 1000
        runAsGroup: 1000
        readOnlyRootFilesystem: true
        capabilities: {add: [NET_BIND_SERVICE, CAP_CHOWN]}
      tmpfs: [{mountPath: /var/cache, sizeLimit: 128Mi}]
    - name: gateway
      image: localhost/aisemble/gateway:latest
      port: 8080
      dependsOn: [llm]
      healthcheck:
        http: {path: /health}
        intervalSeconds: 5
        timeoutSeconds: 2
        retries: 3
        startPeriodSeconds: 10
      resources: {gpuDevices: [nvidia.com/gpu=0]}
      volumeMounts: [{volume: cache, mountPath: /cache}]
  expose:
    - {service: gateway, hostPort: 8080}
    - {service: llm, port: 8000, hostPort: 8081, hostIP: "::1", protocol: udp}
---
apiVersion: v1
kind: Secret
metadata: {name: llm-keys}
type: Opaque
stringData: {api-key: plain-value}
data: {token: c2VjcmV0}
"""

# Their lines of comments left out: the loader is pure Python, and every example counts.
REFERENCE_TEXTS = [
    "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    for text in [p.read_text(encoding="utf-8") for p in REFERENCE_FILES] + [KITCHEN_SINK]
]
REFERENCE_DOCS = [
    doc for text in REFERENCE_TEXTS for doc in yaml.safe_load_all(text) if isinstance(doc, dict)
]


# -- what every input must come to ----------------------------------------------------------


@contextmanager
def no_hang(seconds: int = HANG_SECONDS) -> Iterator[None]:
    """Fail an input that takes longer than `seconds` (a hang would stall CI forever)."""

    def expire(signum: int, frame: Any) -> None:
        raise AssertionError(f"no answer within {seconds}s: the loader hangs on this input")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_clear(exc: ManifestError, source: str = SOURCE) -> None:
    """Every problem names its file, and within a document its line or field, in words."""
    assert exc.problems
    for problem in exc.problems:
        text = str(problem)
        assert problem.source == source, text
        assert problem.message.strip(), text
        if problem.document is not None or source == "kube":  # not the file as a whole
            assert problem.line is not None or problem.path, text
        assert "[type=" not in text and "For further information" not in text, text
        assert "instance of" not in text, text  # pydantic naming a model class


def check_loaded(manifests: Manifests, store: Store) -> None:
    """What apply and diff do with what loaded must work: store, render, round-trip."""
    for doc in manifests.documents:
        resource = doc.resource
        assert AISemble.model_validate(resource.to_document()) == resource
        shown = _comparable(resource)  # diff's YAML: to_document without what the store sets
        [again] = load_text(shown, "again.yaml").documents
        assert again.resource.spec == resource.spec
        assert again.resource.metadata == resource.metadata.model_copy(
            update={"generation": None, "creationTimestamp": None}
        )
        # The store keeps the spec as JSON.
        kept = AISemble.model_validate_json(resource.model_dump_json(exclude_none=True))
        assert kept.spec == resource.spec
    try:
        store.apply(manifests.documents, dry_run=True)
    except StoreError as exc:
        assert str(exc)
    for secret in manifests.secrets:
        assert secret.secret.values()


def loads_or_explains(text: str, store: Store) -> Manifests | None:
    with no_hang():
        try:
            manifests = load_text(text, SOURCE)
        except ManifestError as exc:
            assert_clear(exc)
            event("refused")
            return None
        check_loaded(manifests, store)
    event("loaded a resource" if manifests.documents else "loaded no resource")
    return manifests


def validates_or_explains(data: Any) -> None:
    """The kube source's entry: a parsed object, no lines to give."""
    if not isinstance(data, dict):
        return
    try:
        resource = load_object(data, "kube")
    except ManifestError as exc:
        assert_clear(exc, "kube")
        return
    assert load_object(resource.to_document(), "kube") == resource


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    with tempfile.TemporaryDirectory(prefix="aisemble-fuzz-") as directory:
        made = Store(Path(directory))
        yield made
        made.close()


# -- what to feed it ---------------------------------------------------------------------------


def field_names(*models: type[pydantic.BaseModel]) -> list[str]:
    """Every field name of `models` and of the models inside them."""
    found: set[str] = set()
    todo, seen = list(models), set()
    while todo:
        model = todo.pop()
        if model not in seen:
            seen.add(model)
            for name, info in model.model_fields.items():
                found.add(name)
                todo.extend(_models_in(info.annotation))
    return sorted(found)


def _models_in(annotation: Any) -> list[type[pydantic.BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


FIELD_NAMES = field_names(AISemble, Secret)
ANY_CHARACTER = st.characters(exclude_categories=())  # surrogates and controls too
MAGIC_STRINGS = [
    "", " ", "-1Gi", "1e400", "1e-400", "500m", "0.5", "1.5.5", "1Zi", "8Gi", "NaN", ".inf",
    "-0", "0x10", "0o7", "1_000", "true", "yes", "no", "on", "~", "null", "2020-13-45",
    "2020-01-01", "12:30:00", "<<", "*a", "&a", "!!binary", "A", "-a", "a-", "a" * 64, "a_b",
    "ä", "a.b", "nvidia.com/gpu=0", "nvidia.com/gpu", "/", "/tmp", "relative/path", "0.0.0.0",
    "::1", "fe80::1%eth0", "300.1.1.1", "localhost", "restricted", "privileged", "shared",
    "auto", "udp", "HTTPS", "CAP_SYS_ADMIN", API_VERSION, "v1", "AISemble", "Secret", "Pod",
    "\t", "\x00", "\x85", "\u2028", "\ufeff", "\ud800", "😀😀", "\U0010ffff", "a\nb", "a: b",
    "- a", "{a: b}", "[a]", "#", "'", '"', "\\", "%", "@", "`", "|", ">", "x" * 2000,
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, 10**30, -(10**30), 65535, 65536, 10**4000]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(ANY_CHARACTER, max_size=20),
    st.sampled_from(MAGIC_STRINGS),
)
KEYS = st.one_of(st.sampled_from(FIELD_NAMES), st.text(ANY_CHARACTER, max_size=10), SCALARS)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=8,
)

DNS_LABELS = ["", "A", "-a", "a-", "a" * 63, "a" * 64, "a_b", "ä", "a.b", "web", "llm", 5, None]
QUANTITIES = [
    "-1Gi", "1e400", "0", "5m", "10m", "1.5.5", "1Zi", "9" * 60, "1Ei", "8E", 0, -1, 1, 1.5,
    float("inf"), float("nan"), True, "1e3", "0.000000001", " 2 ", "1.", ".5", "5Mi", 10**30,
]  # fmt: skip
PORTS = [0, 1, 65535, 65536, -1, "80", 80.0, 80.5, 2**64, True, None, 8080, 8081]
COUNTS = [0, -1, 1, 2, 64, 65, 100, 101, 3600, 3601, 2**31, 2**63, 10**30, 1.0, 1.5, "1", True]
PROBES = [
    {}, {"exec": {}}, {"exec": {"command": []}}, {"httpGet": {"port": 0}}, {"httpGet": {}},
    {"tcpSocket": {}}, {"tcpSocket": {"port": "http"}}, {"exec": {"command": ["x"]}, "tcpSocket": {}},
    {"httpGet": {"path": "no-slash"}}, {"exec": {"command": ["x"]}, "successThreshold": 2},
    {"httpGet": {"httpHeaders": [{"name": "bad name"}]}}, "yes", [], None,
    {"exec": {"command": ["x"]}, "periodSeconds": 0}, {"exec": {"command": [1, None]}},
]  # fmt: skip
FIELD_VALUES: dict[str, list[Any]] = {
    **dict.fromkeys(["name", "service", "volume", "namespace", "nodeName"], DNS_LABELS),
    **dict.fromkeys(["cpus", "memory", "gpuMinMemory", "sizeLimit"], QUANTITIES),
    **dict.fromkeys(["port", "hostPort"], PORTS),
    **dict.fromkeys(["readinessProbe", "livenessProbe", "startupProbe"], PROBES),
    **dict.fromkeys(
        [
            "replicas",
            "gpus",
            "gpuMaxHolders",
            "pidsLimit",
            "runAsUser",
            "runAsGroup",
            "minReadySeconds",
            "terminationGracePeriodSeconds",
            "progressDeadlineSeconds",
            "periodSeconds",
            "timeoutSeconds",
            "failureThreshold",
            "successThreshold",
            "initialDelaySeconds",
            "intervalSeconds",
            "retries",
            "startPeriodSeconds",
            "generation",
        ],
        COUNTS,
    ),  # fmt: skip
    "hostIP": ["0.0.0.0", "::", "::1", "fe80::1%eth0", "1.2.3.4.5", "localhost", "", 127],
    "protocol": ["tcp", "udp", "TCP", "sctp", ""],
    "profile": ["restricted", "baseline", "privileged", "root", ""],
    "add": [["SYS_ADMIN"], ["CAP_NET_BIND_SERVICE"], ["net_admin"], [""], [1], "NET_ADMIN"],
    "mountPath": ["/", "", "relative", "/tmp", "/models", "/cache", "//", "/a b"],
    "gpuDevices": [[], ["nvidia.com/gpu=0", "nvidia.com/gpu=0"], ["gpu0"], "nvidia.com/gpu=0"],
    "gpuKind": ["nvidia.com/gpu", "nvidia", "NVIDIA.com/gpu", ""],
    "dependsOn": [["web"], ["llm"], ["ghost"], ["llm", "llm"], "llm", [None]],
    "env": [
        [{"name": "A"}, {"name": "A"}],
        [{"name": "1A"}],
        [{"name": "A", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
    ],
    "secretKeyRef": [{"name": "s"}, {"name": "S", "key": "k"}, {"name": "s", "key": "a/b"}],
    "data": [{"k": "not base64!"}, {"k": ""}, {"": "eA=="}, {"k": 5}, {}, {"a/b": "eA=="}],
    "stringData": [{"k": ""}, {"k": 5}, {"k": None}, {}, {"é": "x"}],
    "annotations": [{"aisemble.io/suspend": "maybe"}, {"aisemble.io/suspend": True}, {"a": 1}],
    "labels": [{"a": 1}, {1: "a"}, {"a": None}],
    "nodeSelector": [{"a": 1}, {}, {"gpu": "yes"}],
    "creationTimestamp": ["2020-01-01T00:00:00Z", "yesterday", 0, 10**20, -1],
    "apiVersion": [API_VERSION, "aisemble.io/v1", "v1", "apps/v1", ""],
    "kind": ["AISemble", "Secret", "Pod", "aisemble", ""],
    "rollback": ["auto", "none", "always"],
    "gpuSharing": ["exclusive", "shared", "time-sliced"],
    "scheme": ["HTTP", "HTTPS", "http"],
}


def values_for(key: object) -> st.SearchStrategy[Any]:
    special = FIELD_VALUES.get(key) if isinstance(key, str) else None
    if special is None:
        return VALUES
    return st.one_of(st.sampled_from(special), VALUES)


def spots(tree: Any) -> list[tuple[Any, Any]]:
    """(container, key) of every value in `tree`."""
    found: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            items = list(node.items())
        elif isinstance(node, list):
            items = list(enumerate(node))
        else:
            return
        for key, value in items:
            found.append((node, key))
            walk(value)

    walk(tree)
    return found


Draw = Callable[[st.SearchStrategy[Any]], Any]


def _delete(draw: Draw, container: Any, key: Any) -> None:
    del container[key]


def _replace(draw: Draw, container: Any, key: Any) -> None:
    container[key] = copy.deepcopy(draw(values_for(key)))  # later mutations change it


def _duplicate(draw: Draw, container: Any, key: Any) -> None:
    if isinstance(container, list):
        container.insert(key, copy.deepcopy(container[key]))
    else:
        _replace(draw, container, key)


def _rename(draw: Draw, container: Any, key: Any) -> None:
    if isinstance(container, dict):
        container[draw(KEYS)] = container.pop(key)
    else:
        _insert(draw, container, key)


def _insert(draw: Draw, container: Any, key: Any) -> None:
    if isinstance(container, dict):
        new = draw(KEYS)
        container[new] = copy.deepcopy(draw(values_for(new)))
    else:
        container.insert(key, draw(VALUES))


def _wrap(draw: Draw, container: Any, key: Any) -> None:
    container[key] = draw(st.sampled_from([[container[key]], {"x": container[key]}]))


MUTATIONS = [_delete, _replace, _replace, _duplicate, _rename, _insert, _wrap]


@st.composite
def mutated_documents(draw: Draw) -> Any:
    """A reference document with one to four mutations of its data."""
    doc = copy.deepcopy(draw(st.sampled_from(REFERENCE_DOCS)))
    for _ in range(draw(st.integers(1, 4))):
        found = spots(doc)
        if not found:
            break
        container, key = found[draw(st.integers(0, len(found) - 1))]
        draw(st.sampled_from(MUTATIONS))(draw, container, key)
    return doc


def dumped(docs: list[Any], draw: Draw) -> str:
    """`docs` as YAML, in one of the styles people write."""
    style = draw(st.sampled_from([False, None, True]))
    unicode = draw(st.booleans())
    options = {"default_flow_style": style, "allow_unicode": unicode, "sort_keys": False}
    try:  # libyaml's emitter is the faster by far; it refuses lone surrogates
        return yaml.dump_all(docs, Dumper=yaml.CSafeDumper, **options)
    except (yaml.YAMLError, UnicodeError):
        return yaml.safe_dump_all(docs, **options)


@st.composite
def mutated_texts(draw: Draw) -> str:
    docs = [draw(mutated_documents())]
    if draw(st.booleans()):  # beside valid documents: across-document checks
        docs = draw(
            st.permutations(docs + draw(st.lists(st.sampled_from(REFERENCE_DOCS), max_size=2)))
        )
    return dumped(docs, draw)


SHAPED_SERVICE = st.builds(
    lambda name, image, extra: {"name": name, "image": image, **extra},
    st.sampled_from(DNS_LABELS),
    st.text(ANY_CHARACTER, max_size=10),
    st.dictionaries(st.sampled_from(FIELD_NAMES), VALUES, max_size=4),
)
SHAPED_DOCUMENT = st.fixed_dictionaries(
    {
        "apiVersion": values_for("apiVersion"),
        "kind": values_for("kind"),
        "metadata": st.one_of(
            VALUES,
            st.fixed_dictionaries({"name": st.sampled_from(DNS_LABELS)}, optional={"x": VALUES}),
        ),
        "spec": st.one_of(
            VALUES,
            st.dictionaries(st.sampled_from(FIELD_NAMES), VALUES, max_size=6),
            st.fixed_dictionaries(
                {"services": st.lists(SHAPED_SERVICE, max_size=3)},
                optional={"volumes": VALUES, "expose": VALUES, "security": VALUES},
            ),
        ),
    },
    optional={"status": VALUES, "stringData": VALUES, "data": VALUES},
)


@st.composite
def random_documents(draw: Draw) -> str:
    """Documents of every shape: apiVersion, kind, metadata and spec each right or random."""
    return dumped(draw(st.lists(SHAPED_DOCUMENT | VALUES, min_size=1, max_size=2)), draw)


YAML_TOKENS = [
    "\n", "\n  ", "\n    ", "- ", ": ", ", ", "{", "}", "[", "]", "---\n", "...\n", "'", '"',
    "\\", "#", "|\n", ">-\n", "? ", "&a ", "*a", "&b ", "*b", "<<: *a\n", "!!int ", "!!float ",
    "!!bool ", "!!timestamp ", "!!binary ", "!!set ", "!!omap ", "!!pairs ", "!!str ",
    "!!null ", "!!map ", "!!seq ", "!custom ", "!<tag:x> ", "!!python/object/apply:os.system ",
    "%YAML 1.1\n", "%YAML 2.0\n", "%TAG ! tag:x,\n", "\t", "~", "null", "2020-13-45",
    "1e400", "0b", "0x", "9" * 4400, "apiVersion: aisemble.io/v1alpha1\n", "kind: AISemble\n",
    "kind: Secret\napiVersion: v1\n", "metadata:\n  name: a\n", "spec:\n  services:\n",
    "    - name: web\n      image: img\n", "name", "image", "port", "x", "\x00", "\x85",
    "\ufeff", "\U0001f600",
]  # fmt: skip
TOKEN_SOUP = st.lists(
    st.one_of(st.sampled_from(YAML_TOKENS), st.text(ANY_CHARACTER, max_size=4)), max_size=60
).map("".join)


@st.composite
def mangled_texts(draw: Draw) -> str:
    """A reference manifest with one to three edits of its text."""
    text = draw(st.sampled_from(REFERENCE_TEXTS))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        lines = text.splitlines(keepends=True)
        line = draw(st.integers(0, max(len(lines) - 1, 0)))
        edit = draw(st.sampled_from(["cut", "flip", "insert", "twice", "drop", "indent"]))
        if edit == "cut":
            text = text[:at]
        elif edit == "flip":
            text = text[:at] + draw(ANY_CHARACTER) + text[at + 1 :]
        elif edit == "insert":
            text = text[:at] + draw(st.sampled_from(YAML_TOKENS)) + text[at:]
        elif lines and edit == "twice":  # a key written twice, mostly
            text = "".join(lines[: line + 1] + lines[line:])
        elif lines and edit == "drop":
            text = "".join(lines[:line] + lines[line + 1 :])
        elif lines:
            shift = draw(st.sampled_from(["  ", "\t", " "]))
            lines[line] = shift + lines[line] if draw(st.booleans()) else lines[line][2:]
            text = "".join(lines)
    return text


@st.composite
def alias_bombs(draw: Draw) -> str:
    """Nested aliases, each level repeating the one below `width` times."""
    width, depth = draw(st.integers(2, 9)), draw(st.integers(1, 9))
    items = ", ".join(["x"] * width)
    levels = [f"  l0: &l0 [{items}]"]
    for level in range(1, depth + 1):
        levels.append(f"  l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    top = f"*l{depth}"
    where = draw(st.sampled_from(["meta", "command", "kind", "name", "spec", "labels"]))
    return (
        f"apiVersion: {API_VERSION}\n"
        f"kind: {top if where == 'kind' else 'AISemble'}\n"
        "metadata:\n"
        f"  name: {top if where == 'name' else 'bomb'}\n"
        + "\n".join(levels)
        + (f"\n  labels: {top}" if where == "labels" else "")
        + (f"\n  boom: {top}" if where == "meta" else "")
        + "\nspec:"
        + (f" {top}\n" if where == "spec" else "\n  services:\n    - name: web\n      image: i\n")
        + (f"      command: {top}\n" if where == "command" else "")
    )


LABEL = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?", fullmatch=True)
# What YAML finds hard to write back, that a string field still takes (no lone surrogates).
FREE_TEXT = st.one_of(
    st.text(max_size=30), st.sampled_from([t for t in MAGIC_STRINGS if "\ud800" not in t])
)
TEXT_KEYS = st.text(max_size=6)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),  # no lone surrogates: metadata refuses them
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT_KEYS, inner, max_size=3),
    max_leaves=6,
)
TEXT_MAP = st.dictionaries(st.text(max_size=8), FREE_TEXT, max_size=3)
SERVICE_EXTRAS = st.fixed_dictionaries(
    {},
    optional={
        "command": st.lists(FREE_TEXT, max_size=3),
        "args": st.lists(FREE_TEXT, max_size=3),
        "env": st.lists(
            st.fixed_dictionaries(
                {"name": st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,8}", fullmatch=True)},
                optional={"value": FREE_TEXT},
            ),
            max_size=3,
            unique_by=lambda e: e["name"],
        ),
        "replicas": st.integers(0, 64),
        "resources": st.fixed_dictionaries(
            {},
            optional={
                "cpus": st.sampled_from(["1", "0.5", "250m", 2, 1.5, "10m"]),
                "memory": st.sampled_from(["64Mi", "1Gi", "1G", 2**30, "6Mi"]),
                "gpuSharing": st.sampled_from(["exclusive", "shared"]),
            },
        ),
        "securityContext": st.fixed_dictionaries(
            {},
            optional={
                "readOnlyRootFilesystem": st.booleans(),
                "runAsUser": st.integers(1, 2**31 - 1),
            },
        ),
        "tmpfs": st.sampled_from(
            [[], [{"mountPath": "/var/x"}], [{"mountPath": "/r", "sizeLimit": 4096}]]
        ),
        "startupProbe": st.builds(
            lambda c: {"exec": {"command": c}}, st.lists(FREE_TEXT, min_size=1, max_size=2)
        ),
    },
)
PORTED_EXTRAS = st.fixed_dictionaries(  # what needs a port
    {"port": st.integers(1, 65535)},
    optional={
        "livenessProbe": st.sampled_from(
            [{"tcpSocket": {}}, {"httpGet": {}}, {"httpGet": {"path": "/x"}}]
        ),
        "readinessProbe": st.builds(
            lambda v: {"httpGet": {"httpHeaders": [{"name": "X-A", "value": v}]}}, FREE_TEXT
        ),
    },
)
META_EXTRAS = st.fixed_dictionaries(
    {},
    optional={
        "namespace": LABEL,
        "labels": TEXT_MAP,
        "annotations": TEXT_MAP.map(lambda m: {k: v for k, v in m.items() if "suspend" not in k}),
        "uid": JSON,
        "managedFields": JSON,
    },
)
SPEC_EXTRAS = st.fixed_dictionaries(
    {},
    optional={
        "nodeSelector": TEXT_MAP,
        "suspend": st.booleans(),
        "progressDeadlineSeconds": st.integers(1, 10**6),
        "network": st.fixed_dictionaries({}, optional={"egress": st.booleans()}),
    },
)


@st.composite
def valid_stacks(draw: Draw) -> dict:
    """A valid AISemble whose free-text fields hold what YAML finds hard to write."""
    services = []
    for name in draw(st.lists(LABEL, min_size=1, max_size=3, unique=True)):
        service = {"name": name, "image": draw(FREE_TEXT.filter(bool)), **draw(SERVICE_EXTRAS)}
        if draw(st.booleans()):
            service.update(draw(PORTED_EXTRAS))
        services.append(service)
    with_ports = [s for s in services if "port" in s][: draw(st.integers(0, 3))]
    spec = {"services": services, **draw(SPEC_EXTRAS)}
    if with_ports:
        spec["expose"] = [
            {"service": s["name"], "hostPort": 20000 + i} for i, s in enumerate(with_ports)
        ]
    meta = {"name": draw(LABEL), **draw(META_EXTRAS)}
    return {"apiVersion": API_VERSION, "kind": "AISemble", "metadata": meta, "spec": spec}


# -- the properties ------------------------------------------------------------------------------


class TestNoInputCrashesTheLoader:
    @FUZZ
    @given(st.text(ANY_CHARACTER, max_size=300))
    def test_random_text(self, store: Store, text: str) -> None:
        loads_or_explains(text, store)

    @FUZZ
    @given(TOKEN_SOUP)
    def test_yaml_token_soup(self, store: Store, text: str) -> None:
        loads_or_explains(text, store)

    @FUZZ
    @given(random_documents())
    def test_random_documents(self, store: Store, text: str) -> None:
        loads_or_explains(text, store)

    @FUZZ
    @given(valid_stacks(), st.data())
    def test_valid_stacks_load_and_round_trip(
        self, store: Store, stack: dict, data: st.DataObject
    ) -> None:
        manifests = loads_or_explains(dumped([stack], data.draw), store)
        assert manifests is not None and len(manifests.documents) == 1

    @FUZZ
    @given(mutated_texts())
    def test_mutated_reference_documents(self, store: Store, text: str) -> None:
        loads_or_explains(text, store)

    @FUZZ
    @given(mangled_texts())
    def test_mangled_reference_texts(self, store: Store, text: str) -> None:
        loads_or_explains(text, store)

    @FUZZ
    @given(alias_bombs())
    def test_alias_bombs_are_refused_or_bounded(self, store: Store, text: str) -> None:
        loads_or_explains(text, store)

    @FUZZ
    @given(st.one_of(mutated_documents(), st.deferred(lambda: VALUES)))
    def test_parsed_objects_from_the_kube_api(self, data: Any) -> None:
        with no_hang():
            validates_or_explains(data)

    @FUZZ
    @given(st.sampled_from(REFERENCE_TEXTS), st.data())
    def test_files_with_flipped_bytes(self, store: Store, text: str, data: st.DataObject) -> None:
        raw = bytearray(text.encode("utf-8"))
        for _ in range(data.draw(st.integers(1, 3))):
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        with tempfile.TemporaryDirectory() as directory, no_hang():
            path = Path(directory) / "fuzz.yaml"
            path.write_bytes(bytes(raw))
            try:
                manifests = load_paths([directory])
            except ManifestError as exc:
                assert_clear(exc, str(path))
                return
            check_loaded(manifests, store)


CANARY = "Canary-53cr3t"


class TestSecretValuesStayOutOfMessages:
    @FUZZ
    @given(
        st.sampled_from(["data", "stringData"]),
        st.sampled_from(
            [CANARY, [CANARY], {"k": CANARY}, CANARY + "\x00", CANARY + "!", 5, None, "", "=="]
        ),
        st.sampled_from(["k", "bad key", "", "k" * 300]),
    )
    def test_a_broken_secret_is_explained_without_its_values(
        self, where: str, value: Any, key: str
    ) -> None:
        doc = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, where: {key: value}}
        with no_hang():
            try:
                load_text(yaml.safe_dump(doc), SOURCE)
            except ManifestError as exc:
                assert_clear(exc)
                assert CANARY not in str(exc)


def test_the_reference_manifests_load_as_they_are(store: Store) -> None:
    for text in REFERENCE_TEXTS:
        manifests = load_text(text, SOURCE)
        assert manifests.documents or manifests.skipped
        check_loaded(manifests, store)


# -- what the fuzzing found: each crash, as a plain example ----------------------------------

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


def only_problem(text: str) -> str:
    with pytest.raises(ManifestError) as info:
        load_text(text, "s.yaml")
    [problem] = info.value.problems
    return str(problem)


class TestYamlThatCrashedTheLoader:
    def test_a_control_character_is_a_located_problem(self) -> None:
        # was: yaml.reader.ReaderError, raised where the loader was made
        problem = only_problem(GOOD + "      args: [a\x01]\n")
        assert problem.startswith("s.yaml: document 1 (line 9, column 15): invalid YAML:")
        assert "U+0001 is not allowed" in problem

    def test_deep_nesting_is_refused_not_a_recursion_error(self) -> None:
        problem = only_problem("[" * 5000)
        assert f"nested deeper than {MAX_DEPTH} levels" in problem and "(line 1," in problem

    def test_an_integer_longer_than_python_converts_is_a_problem(self) -> None:
        # was: ValueError "Exceeds the limit (4300 digits) for integer string conversion"
        problem = only_problem(GOOD + "      replicas: " + "9" * 5000 + "\n")
        assert "(line 9, column 17)" in problem and "is not a valid int (more than" in problem

    @pytest.mark.parametrize(
        ("value", "was"),
        [
            ("2020-13-45", "ValueError"),
            ("2020-01-01 10:00:00 +25:00", "ValueError"),
            ("!!float abc", "ValueError"),
            ("!!int 0b", "ValueError"),
            ("!!bool maybe", "KeyError"),
            ("!!timestamp soon", "AttributeError"),
            ("!!int", "IndexError"),
        ],
    )
    def test_a_scalar_that_is_not_what_its_tag_says_is_a_problem(
        self, value: str, was: str
    ) -> None:
        problem = only_problem(GOOD + f"      replicas: {value}\n")
        assert "(line 9, column 17): invalid YAML:" in problem and "is not a valid" in problem

    def test_an_alias_inside_its_own_anchor_is_refused(self) -> None:
        # was: RecursionError on the self-containing list
        problem = only_problem(GOOD + "      args: &a [x, *a]\n")
        assert "alias *a is inside the node it refers to" in problem and "(line 9" in problem

    def test_a_billion_laughs_is_refused_quickly_and_in_little_memory(self) -> None:
        # was: a hang, walking 9**9 nodes for duplicate keys
        levels = ["  l0: &l0 [x, x, x, x, x, x, x, x, x]"] + [
            f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)
        ]
        text = GOOD.replace("  name: lab\n", "  name: lab\n" + "\n".join(levels) + "\n")
        tracemalloc.start()
        try:
            with no_hang(10):
                problem = only_problem(text)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert f"aliases repeat more than {MAX_ALIASED_NODES} nodes" in problem
        assert peak < 20 * 2**20

    def test_aliases_within_the_bound_load(self) -> None:
        text = GOOD + "      args: &args [a, b]\n    - name: api\n      image: img\n"
        loaded = load_text(text + "      args: *args\n", "s.yaml")
        assert [s.args for s in loaded.documents[0].resource.spec.services] == [["a", "b"]] * 2

    def test_a_key_a_merge_brings_may_be_overridden(self) -> None:
        # was: "duplicate key 'image'", for YAML's way of overriding a merged key
        text = GOOD.replace("    - name: web\n      image: img\n", "")
        text += "    - &base {name: web, image: img, port: 80}\n"
        text += "    - <<: *base\n      name: api\n"
        services = load_text(text, "s.yaml").documents[0].resource.spec.services
        assert [(s.name, s.image, s.port) for s in services] == [
            ("web", "img", 80),
            ("api", "img", 80),
        ]

    def test_a_key_written_twice_beside_a_merge_is_still_a_problem(self) -> None:
        text = GOOD.replace("    - name: web\n      image: img\n", "")
        text += "    - &base {name: web, image: img}\n"
        text += "    - <<: *base\n      name: api\n      name: api2\n"
        problem = only_problem(text)
        assert "spec.services[1].name (line 10): duplicate key 'name'" in problem


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (
            "services: [yes]",
            "spec.services[0] (line 6, column 14): must be a mapping of fields, not a boolean",
        ),
        (
            "services: [[web]]",
            "spec.services[0] (line 6, column 14): must be a mapping of fields, not a list",
        ),
        (
            "nodeSelector: [a]",
            "spec.nodeSelector (line 6, column 3): must be a mapping (key: value), not a list",
        ),
    ],
)
def test_a_field_that_must_be_a_mapping_says_what_it_got(value: str, said: str) -> None:
    # was: "Input should be a valid dictionary or instance of Service"
    text = GOOD.replace("  services:\n    - name: web\n      image: img\n", f"  {value}\n")
    if "services" not in value:
        text += "  services: [{name: web, image: img}]\n"
    assert only_problem(text).endswith(said)


def test_python_tags_are_refused_not_run(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    tag = f"!!python/object/apply:os.mkdir [{str(ran)!r}]"
    problem = only_problem(GOOD.replace("image: img", f"image: {tag}"))
    assert "could not determine a constructor for the tag" in problem and "(line 8" in problem
    assert not ran.exists()


class TestMetadataThatBrokeTheRoundTrip:
    @pytest.mark.parametrize(
        ("value", "why"),
        [
            ("!!binary /w==", "binary data"),  # was: UnicodeDecodeError in to_document
            ("2020-01-01", "an unquoted date"),  # came back a string
            (".nan", "nan is not a number"),  # came back unequal
            ("{1: a}", "the key 1 is not a string"),  # came back "1"
            ("[{ok: !!set {a}}]", "a set"),
            ('"\\ud800"', "a lone surrogate"),  # was: kept, and no JSON encoder takes it
            ('{"\\udfff": 1}', "a key holds a lone surrogate"),
        ],
    )
    def test_kept_fields_must_be_json(self, value: str, why: str) -> None:
        problem = only_problem(GOOD.replace("  name: lab\n", f"  name: lab\n  extra: {value}\n"))
        assert problem.startswith("s.yaml: document 1 (AISemble lab): metadata.extra")
        assert "(line 5, column " in problem and why in problem

    @pytest.mark.parametrize(
        "extra", ["extra: null", "extra: {}", "extra: {a: {}, b: [], c: null}", "uid: abc"]
    )
    def test_kept_fields_come_back_as_given(self, extra: str) -> None:
        text = GOOD.replace("  name: lab\n", f"  name: lab\n  {extra}\n")
        resource = load_text(text, "s.yaml").documents[0].resource
        again = load_text(yaml.safe_dump(resource.to_document()), "again.yaml")
        assert again.documents[0].resource == resource


class TestEmptyFieldsThatTheDocumentDropped:
    @pytest.mark.parametrize(
        "field",
        [
            "livenessProbe: {tcpSocket: {}}",  # was: dropped, and the document invalid
            "command: []",  # came back unset: the image's entrypoint instead of none
            "args: []",
            "securityContext: {}",
        ],
    )
    def test_an_empty_value_that_is_not_the_default_is_kept(self, field: str) -> None:
        text = GOOD.replace("image: img", f"image: img\n      port: 80\n      {field}")
        resource = load_text(text, "s.yaml").documents[0].resource
        again = load_text(yaml.safe_dump(resource.to_document()), "again.yaml")
        assert again.documents[0].resource == resource

    def test_empty_defaults_are_still_left_out(self) -> None:
        text = GOOD.replace("image: img", "image: img\n      env: []\n      resources: {}")
        doc = load_text(text, "s.yaml").documents[0].resource.to_document()
        assert doc["spec"]["services"] == [{"name": "web", "image": "img", **_service_defaults()}]
        assert "labels" not in doc["metadata"] and "volumes" not in doc["spec"]


def _service_defaults() -> dict:
    return {"replicas": 1, "terminationGracePeriodSeconds": 10}


class TestModelCrashes:
    def test_a_long_chain_of_dependencies_is_no_recursion_error(self) -> None:
        # was: RecursionError in find_cycle, past Python's recursion limit
        names = [f"s{i}" for i in range(3000)]
        assert find_cycle({a: [b] for a, b in zip(names, names[1:], strict=False)}) is None
        assert find_cycle(
            {**{a: [b] for a, b in zip(names, names[1:], strict=False)}, "s2999": ["s0"]}
        ) == [
            *names,
            "s0",
        ]

    def test_a_progress_deadline_past_year_9999_is_refused(self) -> None:
        # was: accepted, then OverflowError in the reconciler's `rollout + timedelta(...)`
        problem = only_problem(GOOD + "  progressDeadlineSeconds: 1000000000000\n")
        assert "spec.progressDeadlineSeconds (line 9" in problem and "2147483647" in problem

    def test_a_generation_beyond_int64_is_refused(self, store: Store) -> None:
        # was: accepted, then OverflowError storing it (the kube source keeps generations)
        with pytest.raises(ManifestError) as info:
            load_object(
                {**yaml.safe_load(GOOD), "metadata": {"name": "lab", "generation": 2**70}}, "kube"
            )
        assert [p.path for p in info.value.problems] == ["metadata.generation"]
        top = yaml.safe_load(GOOD.replace("name: lab", f"name: lab\n  generation: {2**63 - 1}"))
        resource = load_object(top, "kube")
        store.apply([Document("kube", 1, 1, resource)], keep_generation=True, dry_run=True)

    def test_a_quantity_of_a_million_digits_is_a_problem(self) -> None:
        # was: decimal.Overflow out of the quantity's arithmetic
        text = GOOD + f"      resources: {{cpus: '{'9' * 1_000_000}'}}\n"
        problem = only_problem(text)
        assert "spec.services[0].resources.cpus (line 9" in problem
        assert "is not a CPU quantity" in problem and len(problem) < 300

    @pytest.mark.parametrize("quantity", ["{memory: 8Ei}", "{cpus: '99999999999'}"])
    def test_a_quantity_beyond_what_podman_takes_is_refused(self, quantity: str) -> None:
        # was: accepted, and refused by podman (int64) when the container was made
        problem = only_problem(GOOD + f"      resources: {quantity}\n")
        assert "more than podman can take" in problem

    def test_a_kube_object_whose_metadata_is_not_a_mapping_is_a_problem(self) -> None:
        # was: AttributeError: 'list' object has no attribute 'get'
        with pytest.raises(ManifestError) as info:
            load_object({"apiVersion": API_VERSION, "kind": "AISemble", "metadata": [1]}, "kube")
        assert any(p.path == "metadata" for p in info.value.problems)
