"""The user docs point only at files that exist, and their examples are valid input."""
import re
from pathlib import Path

from calibnet.domains import read_domains

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "experiments").glob("*.md"))]


def test_every_relative_link_of_the_docs_exists():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken


def test_no_doc_names_files_outside_the_repository():
    outside = [f"{page.relative_to(ROOT)}: {hit}" for page in PAGES
               for hit in re.findall(r"\.\./shared/\S*|DESIGN(?:\.md| §)", page.read_text())]
    assert not outside


def test_the_example_domains_csv_is_valid():
    table = read_domains(ROOT / "docs" / "examples" / "domains.csv")
    assert {"case_id", "center", "vendor", "patient"} <= set(table.columns) and len(table) == 8


def test_license_and_citation_are_there():
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert "license = Apache-2.0" in (ROOT / "setup.cfg").read_text()
    citation = (ROOT / "CITATION.cff").read_text()
    for title in ("Confidence-Calibrating Regularization", "MedSAM-U", "Adversarial Perturbations", "SafeClick",
                  "nnU-Net", "Segment Anything", "SAM 2", "Segment anything in medical images"):
        assert title in citation
