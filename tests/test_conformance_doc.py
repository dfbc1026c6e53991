"""docs/conformance.md, the DICOM Conformance Statement, against the code: the transfer
syntaxes the listener accepts (in its order of preference), the abstract syntaxes it counts,
the C-STORE statuses the listener returns and the export reads, the SOP classes, modalities
and series numbers of the result objects, and the network defaults it states. A transfer
syntax, status, result kind or writer added to the code without the document fails here."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from dciodvfy import chest_xray
from pydicom.pixels import get_decoder
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from test_results_bad_values import every_result

import dicomnode.results
from dicomnode.config import Destination, Settings
from dicomnode.export import scu
from dicomnode.export.jobs import EXPORTS_PER_ASSOCIATION
from dicomnode.findings import Algorithm, DerivedImage
from dicomnode.ingest import keepalive
from dicomnode.ingest.scp import StorageSCP
from dicomnode.results.derived import SAME_CLASS_SOURCES, build_derived

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "conformance.md"
INGEST = REPO / "dicomnode" / "ingest"
UID_IN_CELL = re.compile(r"`([0-9]+(?:\.[0-9]+)+)`")
STATUS_IN_CELL = re.compile(r"`(0x[0-9A-Fa-f]{4})`")

ALGORITHM = Algorithm(name="conformance-demo", version="1.0.0")
# The result writers this test builds an object of; a new one must be added here and to the
# document's objects table.
WRITERS = {"build_sr", "build_overlay", "build_seg", "build_gsps", "build_derived", "build_kos"}


def section(title: str) -> str:
    """The text under the heading whose title starts with ``title``, up to the next heading
    of the same or a higher level."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        heading = re.match(r"(#+) (.*)", line)
        if heading and heading.group(2).startswith(title):
            level = len(heading.group(1))
            body = []
            for rest in lines[index + 1 :]:
                other = re.match(r"(#+) ", rest)
                if other and len(other.group(1)) <= level:
                    break
                body.append(rest)
            return "\n".join(body)
    raise AssertionError(f"docs/conformance.md has no section {title!r}")


def tables(text: str) -> list[list[dict[str, str]]]:
    """The Markdown tables in ``text``, each as its rows keyed by the header's cells."""
    found: list[list[dict[str, str]]] = []
    header: list[str] | None = None
    for line in [*text.splitlines(), ""]:
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            found.append([])
        elif not all(set(cell) <= set("-: ") for cell in cells):
            found[-1].append(dict(zip(header, cells, strict=True)))
    return found


def table(title: str, column: str) -> list[dict[str, str]]:
    """The first table of section ``title`` that has ``column``."""
    for rows in tables(section(title)):
        if rows and column in rows[0]:
            return rows
    raise AssertionError(f"section {title!r} of docs/conformance.md has no table with {column!r}")


@pytest.fixture(scope="module")
def listener_ae() -> AE:
    """The AE the listener makes, with the default settings (only ``settings`` is read)."""
    return StorageSCP._make_ae(SimpleNamespace(settings=Settings()))  # type: ignore[arg-type]


def test_transfer_syntax_table_is_what_the_listener_accepts_in_its_order(listener_ae: AE) -> None:
    accepted = {tuple(context.transfer_syntax) for context in listener_ae.supported_contexts}
    assert len(accepted) == 1, "the document says every abstract syntax takes every syntax"
    code = list(accepted.pop())
    rows = table("3.2 ", "Transfer Syntax UID")
    documented = [UID_IN_CELL.fullmatch(row["Transfer Syntax UID"]).group(1) for row in rows]
    assert documented == code, (
        "docs/conformance.md section 3.2 must list ALL_TRANSFER_SYNTAXES in the listener's "
        f"order; missing {sorted(set(code) - set(documented))}, "
        f"not accepted {sorted(set(documented) - set(code))}"
    )
    for row, uid in zip(rows, code, strict=True):
        assert row["Name"].removesuffix(" (retired)") == UID(uid).name, uid
        try:
            decodable = get_decoder(uid).is_available
        except NotImplementedError:
            decodable = False
        assert row["Decoded for analysis"] == ("yes" if decodable else "no"), uid


def test_abstract_syntax_counts(listener_ae: AE) -> None:
    abstract = [str(context.abstract_syntax) for context in listener_ae.supported_contexts]
    assert Verification in abstract
    text = section("3.1 ")
    storage = re.search(r"\*\*(\d+) Storage SOP Classes\*\*", text)
    total = re.search(r"\*\*(\d+) abstract\s+syntaxes\*\*", text)
    assert storage and total, "section 3.1 states the counts in bold"
    assert int(storage.group(1)) == len(abstract) - 1
    assert int(total.group(1)) == len(abstract)


def _objects() -> list[tuple[str, pydicom.Dataset]]:
    """One object of every writer in dicomnode.results (kind as the document names it), and a
    derived image of a source its own class cannot take (Secondary Capture)."""
    builders = {name for name in dicomnode.results.__all__ if name.startswith("build_")}
    assert builders == WRITERS, (
        f"result writers {sorted(builders ^ WRITERS)}: add each new one to "
        "docs/conformance.md section 4 and to WRITERS here"
    )
    source = chest_xray(41, size=128)
    objects = list(every_result(source).items())
    # A source whose own class the derived image cannot take (no Patient Orientation).
    without_orientation = chest_xray(42, size=128)
    del without_orientation.PatientOrientation
    pixels = without_orientation.pixel_array.astype(np.float32)
    derived = DerivedImage(without_orientation, pixels, "bone suppression")
    objects.append(("derived", build_derived(derived, ALGORITHM)))
    return objects


def test_objects_table_lists_every_sop_class_the_writers_produce() -> None:
    rows = table("4 ", "SOP Class UID")
    documented = {
        (row["kind"].strip("`"), UID_IN_CELL.fullmatch(row["SOP Class UID"]).group(1)): row
        for row in rows
    }
    assert len(documented) == len(rows), "one row per kind and SOP class"
    kinds = set(typing.get_args(typing.get_args(Destination.model_fields["outputs"].annotation)[0]))
    assert {kind for kind, _ in documented} == kinds, "the kinds a destination may choose"

    made = set()
    series_numbers = {}
    for kind, ds in _objects():
        row = documented.get((kind, str(ds.SOPClassUID)))
        assert row is not None, f"{kind} {ds.SOPClassUID.name} is not in section 4's table"
        assert row["Modality"] == ds.Modality, (kind, ds.SOPClassUID.name)
        assert int(row["Series Number"]) == int(ds.SeriesNumber), kind
        made.add((kind, str(ds.SOPClassUID)))
        series_numbers[kind] = int(ds.SeriesNumber)
    # A derived image takes its source's class where the node knows that class's IOD.
    for sop_class in SAME_CLASS_SOURCES:
        row = documented.get(("derived", sop_class))
        assert row is not None, f"derived {UID(sop_class).name} is not in section 4's table"
        assert int(row["Series Number"]) == series_numbers["derived"], sop_class
        made.add(("derived", sop_class))
    assert set(documented) == made, (
        f"section 4 lists objects the writers do not make: {sorted(set(documented) - made)}"
    )


def _ingest_status_constants() -> dict[str, int]:
    """``STATUS_*`` constants of the ingest modules: the statuses the listener returns."""
    constants = {}
    for path in sorted(INGEST.glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, int)
            ):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id.startswith("STATUS_"):
                        constants[f"{path.name}:{target.id}"] = node.value.value
    return constants


def test_scp_status_table_is_what_the_listener_returns() -> None:
    rows = table("3.3 ", "Status")
    documented = {int(STATUS_IN_CELL.fullmatch(row["Status"]).group(1), 16) for row in rows}
    constants = _ingest_status_constants()
    assert constants, "the listener's statuses are STATUS_* constants in dicomnode/ingest/"
    missing = {
        name: f"0x{value:04X}" for name, value in constants.items() if value not in documented
    }
    assert not missing, f"statuses the listener returns, not in section 3.3: {missing}"
    source = "\n".join(path.read_text(encoding="utf-8") for path in sorted(INGEST.glob("*.py")))
    literals = {int(found, 16) for found in re.findall(r"\b0x[0-9A-Fa-f]{4}\b", source)}
    stray = sorted(f"0x{status:04X}" for status in documented - literals)
    assert not stray, f"section 3.3 lists statuses the ingest code never names: {stray}"
    assert set(constants.values()) == documented


def test_the_c_store_handler_returns_only_named_statuses() -> None:
    """A status written as a number in scp.py's handlers would escape the check above."""
    tree = ast.parse((INGEST / "scp.py").read_text(encoding="utf-8"))
    literal = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if "int" not in ast.unparse(function.returns or ast.Constant(None)):
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Return) or node.value is None:
                continue
            value = node.value.elts[0] if isinstance(node.value, ast.Tuple) else node.value
            if isinstance(value, ast.Constant) and isinstance(value.value, int):
                literal.append(f"{function.name}: line {node.lineno}")
    assert not literal, f"name the status as a STATUS_* constant: {literal}"


def test_scu_status_table_is_what_the_export_reads() -> None:
    rows = table("3.4 ", "Status")
    stored = {
        int(STATUS_IN_CELL.fullmatch(row["Status"]).group(1), 16)
        for row in rows
        if row["Node's reading"].startswith("stored")
    }
    assert stored == set(scu.STORED)
    assert any(row["Status"] == "`0xA7xx`" for row in rows)
    assert scu.out_of_resources(0xA700) and scu.out_of_resources(0xA7FF)
    assert not scu.out_of_resources(0xA900)


def _value(rows: list[dict[str, str]], parameter: str) -> int:
    row = next((row for row in rows if row["Parameter"].startswith(parameter)), None)
    assert row is not None, f"section 2.3 has no row {parameter!r}"
    return int(re.match(r"\D*(\d+)", row["Value (default)"]).group(1))


def test_network_parameters_are_the_code_defaults(listener_ae: AE) -> None:
    node, storage = Settings().node, Settings().storage
    destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)
    expected = {
        "Maximum PDU length received (SCP)": node.max_pdu,
        "Maximum PDU length received (SCU": AE().maximum_pdu_size,
        "Associations at once (all": node.max_associations,
        "Associations at once from one IP address": node.max_associations_per_address,
        "Largest instance accepted": node.max_instance_bytes,
        "Free disk space kept": storage.min_free_bytes,
        "ACSE timeout (SCP)": listener_ae.acse_timeout,
        "Network (idle) timeout (SCP)": listener_ae.network_timeout,
        "TCP keepalive (SCP)": keepalive.IDLE_SECONDS,
        "ACSE, DIMSE and network timeouts (SCU)": destination.timeout_seconds,
        "Result objects per export association": EXPORTS_PER_ASSOCIATION,
    }
    rows = table("2.3 ", "Parameter")
    for parameter, value in expected.items():
        assert _value(rows, parameter) == value, parameter
    assert listener_ae.maximum_pdu_size == node.max_pdu
    # The listener's timeouts are [node]'s, and each row names its setting.
    for parameter, key in {
        "ACSE timeout (SCP)": "acse_timeout_seconds",
        "Network (idle) timeout (SCP)": "network_timeout_seconds",
    }.items():
        assert _value(rows, parameter) == getattr(node, key), parameter
        row = next(row for row in rows if row["Parameter"].startswith(parameter))
        assert row["Setting"] == f"`[node] {key}`", parameter
    assert listener_ae.maximum_associations == node.max_associations
    identity = section("2.1 ")
    assert f"`{listener_ae.implementation_class_uid}`" in identity
    assert f"`{listener_ae.implementation_version_name}`" in identity
    assert f"default `{node.ae_title}`" in identity
    assert f"`{node.host}:{node.port}`" in identity


def test_readme_links_the_conformance_statement() -> None:
    assert "(docs/conformance.md)" in (REPO / "README.md").read_text(encoding="utf-8")
