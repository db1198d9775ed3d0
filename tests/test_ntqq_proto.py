"""The committed protobuf gencode is what the .proto generates, and the runtime floor matches it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "pipeline" / "ntqq"
GENCODE = PROTO_DIR / "ntqq_body_pb2.py"

_VERSION_RE = re.compile(r"# Protobuf Python Version: (\d+)\.(\d+)\.(\d+)")


def _without_version_stamp(source: str) -> str:
    """The gencode minus the lines naming the protoc version that wrote it."""
    source = _VERSION_RE.sub("# Protobuf Python Version: X", source)
    return re.sub(r"_runtime_version\.Domain\.PUBLIC,\s*\d+,\s*\d+,\s*\d+,", "Domain.PUBLIC, X,", source)


def test_regenerating_from_the_proto_gives_the_committed_file(tmp_path):
    status = protoc.main(
        ["protoc", f"-I{PROTO_DIR}", f"--python_out={tmp_path}", str(PROTO_DIR / "ntqq_body.proto")]
    )
    assert status == 0
    fresh = (tmp_path / "ntqq_body_pb2.py").read_text()
    committed = GENCODE.read_text()
    if _VERSION_RE.search(fresh).groups() == _VERSION_RE.search(committed).groups():
        assert fresh == committed
    else:  # a newer grpcio-tools: only its version stamp may differ
        assert _without_version_stamp(fresh) == _without_version_stamp(committed)


def test_protobuf_floor_in_pyproject_satisfies_the_gencode_runtime_check():
    gencode_version = tuple(int(p) for p in _VERSION_RE.search(GENCODE.read_text()).groups())
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in dependencies if re.match(r"protobuf\s*>=", d)]
    floor = tuple(int(p) for p in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))
    assert floor >= gencode_version, f"pyproject says {spec}; the gencode needs protobuf>={gencode_version}"
    assert floor[0] == gencode_version[0]


def test_the_fast_protobuf_backend_is_in_use():
    from google.protobuf.internal import api_implementation

    assert api_implementation.Type() in ("upb", "cpp")
