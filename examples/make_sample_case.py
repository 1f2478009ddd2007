"""Generate the deterministic sample case ``examples/sample-case/`` ("Smith v. Jones").

Usage::

    python examples/make_sample_case.py [--out examples/sample-case] [--check]

Ownership
---------
This script owns the output folder (default ``examples/sample-case/``) entirely:
every file in it is produced here, and every file in it is input to the importer,
so nothing else (no README, no notes) belongs there. Don't hand-edit those files;
change this script and re-run it. If the folder holds a file this script does not
produce (for example after a file was renamed here), the script refuses to run
until that file is deleted by hand.

The output is byte-for-byte deterministic: all dates, document IDs, MIME boundaries,
ZIP timestamps and "random" bytes are fixed. Running the script twice gives
identical files. ``--check`` regenerates in memory and exits 1 if the folder on
disk differs (useful in CI). The bytes are only guaranteed for the same library
versions (fpdf2, pypdf, python-docx, Pillow and the zlib/libtiff/FreeType it is
built with); another version may write valid but different bytes.

Files and what each one exercises
---------------------------------
pleadings/complaint.pdf
    Text PDF, 3 pages (fpdf2, core fonts). Normal text extraction plus entity
    extraction: case number "Case No. 2:24-cv-01234", citations such as
    "Brown v. Board of Education, 347 U.S. 483 (1954)", statute sections with "§",
    dates, dollar amounts ("$250,000.00"), an e-mail address and a phone number.
pleadings/answer.pdf
    Text PDF, 2 pages. A second pleading in the same folder that refers back to
    the complaint.
discovery/interrogatories.docx
    Word document (python-docx): headings, numbered paragraphs and a 2-column
    table. Exercises DOCX text and table extraction.
discovery/scanned_deposition_excerpt.pdf
    Image-only PDF, 2 pages: 1-bit 200 dpi page images (CCITT G4) written by
    Pillow, with NO text layer. Every page should be routed to OCR; the text is
    large, black on white and easy to OCR (see ``DEPOSITION_PAGES``).
discovery/site_photo.png
    Small PNG picture (drawn intersection with a caption). Exercises image files
    that are not PDFs.
correspondence/letter_to_counsel.eml
    RFC 5322 e-mail (stdlib ``email``, CRLF line endings), multipart/mixed:
    a text/plain body plus an attached one-page text PDF "settlement_offer.pdf".
    Exercises e-mail parsing and attachment extraction. Date, Message-ID and the
    MIME boundary are fixed.
correspondence/call_notes.txt
    Plain UTF-8 text with non-ASCII characters ("café", "§ 1983", "Zoë").
    Exercises encoding handling.
medical_records/er_visit_summary.pdf
    Text PDF, 2 pages (medical record with ICD-10 codes and charges).
medical_records/er_visit_summary_copy.pdf
    Exact byte copy of er_visit_summary.pdf. Exercises duplicate detection.
medical_records/corrupt_scan.pdf
    Starts with a "%PDF-1.7" header and the start of an image object, then
    truncated binary garbage (no catalog, no xref, no trailer). pypdfium2 fails to
    open it (PdfiumError, FPDF_ERR_FORMAT = 3). Exercises the corrupt-file path.
medical_records/sealed_records.pdf
    One-page text PDF encrypted by pypdf with a user password (RC4-128, which
    pypdf can write without extra crypto packages and whose output is
    deterministic once the file ID is fixed). pypdfium2 refuses to open it without
    the password (PdfiumError, FPDF_ERR_PASSWORD = 4). Exercises the
    password-protected path. The password is in ``EXPECTED``.

``EXPECTED`` below lists the properties tests can check for each file.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import time
import zipfile
from datetime import datetime, timedelta, timezone
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

import docx
from docx.shared import Pt
from fpdf import FPDF
from PIL import Image, ImageDraw, ImageFont
from pypdf import PdfReader, PdfWriter
from pypdf.generic import ArrayObject, ByteStringObject

DEFAULT_OUT = Path(__file__).resolve().parent / "sample-case"

CASE_NO = "2:24-cv-01234"
SEALED_PASSWORD = "SealedSmith2024"

# Expected properties of each generated file, keyed by path relative to the
# sample-case folder.
#   kind             - "pdf", "docx", "image", "eml" or "text"
#   pages            - page count as pypdfium2 reports it; None for non-PDFs and
#                      for PDFs that cannot be opened
#   text_layer_pages - pages whose text layer is non-empty; None where pages is None
#   problem          - what the importer should flag, or None:
#                      "no_text_layer" (needs OCR), "duplicate", "corrupt",
#                      "encrypted"
# Optional keys: duplicate_of, password, pages_with_password, attachments.
EXPECTED: dict[str, dict] = {
    "pleadings/complaint.pdf": {
        "kind": "pdf", "pages": 3, "text_layer_pages": 3, "problem": None,
    },
    "pleadings/answer.pdf": {
        "kind": "pdf", "pages": 2, "text_layer_pages": 2, "problem": None,
    },
    "discovery/interrogatories.docx": {
        "kind": "docx", "pages": None, "text_layer_pages": None, "problem": None,
    },
    "discovery/scanned_deposition_excerpt.pdf": {
        "kind": "pdf", "pages": 2, "text_layer_pages": 0, "problem": "no_text_layer",
    },
    "discovery/site_photo.png": {
        "kind": "image", "pages": None, "text_layer_pages": None, "problem": None,
    },
    "correspondence/letter_to_counsel.eml": {
        "kind": "eml", "pages": None, "text_layer_pages": None, "problem": None,
        "attachments": ["settlement_offer.pdf"],
    },
    "correspondence/call_notes.txt": {
        "kind": "text", "pages": None, "text_layer_pages": None, "problem": None,
    },
    "medical_records/er_visit_summary.pdf": {
        "kind": "pdf", "pages": 2, "text_layer_pages": 2, "problem": None,
    },
    "medical_records/er_visit_summary_copy.pdf": {
        "kind": "pdf", "pages": 2, "text_layer_pages": 2, "problem": "duplicate",
        "duplicate_of": "medical_records/er_visit_summary.pdf",
    },
    "medical_records/corrupt_scan.pdf": {
        "kind": "pdf", "pages": None, "text_layer_pages": None, "problem": "corrupt",
    },
    "medical_records/sealed_records.pdf": {
        "kind": "pdf", "pages": None, "text_layer_pages": None, "problem": "encrypted",
        "password": SEALED_PASSWORD, "pages_with_password": 1,
    },
}

# US Eastern (EDT) offset, fixed so the output never depends on the local zone.
EDT = timezone(timedelta(hours=-4))

# --------------------------------------------------------------------------
# Text content
# --------------------------------------------------------------------------

PLAINTIFF_COUNSEL_BLOCK = [
    "/s/ Anita R. Patel",
    "Anita R. Patel, Esquire (PA ID No. 312845)",
    "PATEL INJURY LAW, P.C.",
    "1500 Walnut Street, Suite 900, Philadelphia, PA 19102",
    "Tel: (215) 555-0143",
    "Email: apatel@patelinjurylaw.example",
    "Counsel for Plaintiff Margaret Smith",
]

DEFENSE_COUNSEL_BLOCK = [
    "/s/ Daniel K. O'Brien",
    "Daniel K. O'Brien, Esquire (PA ID No. 298114)",
    "O'BRIEN & VOSS LLP",
    "200 Haddonfield Road, Suite 310, Cherry Hill, NJ 08002",
    "Tel: (856) 555-0178",
    "Email: dobrien@obrienvoss.example",
    "Counsel for Defendant Robert Jones",
]

CAPTION = [
    ("center_bold", "UNITED STATES DISTRICT COURT"),
    ("center_bold", "FOR THE EASTERN DISTRICT OF PENNSYLVANIA"),
    ("gap", ""),
    ("body", "MARGARET SMITH,\n                    Plaintiff,\n          v.\n"
             "ROBERT JONES,\n                    Defendant."),
    ("right_bold", f"Case No. {CASE_NO}"),
    ("gap", ""),
]

# Each page is a list of (style, text); styles: body, heading, center, center_bold,
# right_bold, block (left-aligned lines), mono (Courier columns), gap (blank space).
# build_text_pdf() checks that the text of each listed page really fits on one page.
COMPLAINT_PAGES = [
    CAPTION + [
        ("center_bold", "COMPLAINT AND DEMAND FOR JURY TRIAL"),
        ("body", "Plaintiff Margaret Smith, by and through her undersigned counsel, "
                 "brings this Complaint against Defendant Robert Jones and in support "
                 "thereof avers as follows:"),
        ("heading", "PARTIES"),
        ("body", "1. Plaintiff Margaret Smith is an adult individual and a citizen of "
                 "the Commonwealth of Pennsylvania residing at 418 Larchwood Avenue, "
                 "Philadelphia, PA 19104."),
        ("body", "2. Defendant Robert Jones is an adult individual and a citizen of the "
                 "State of New Jersey residing at 77 Delsea Drive, Glassboro, NJ 08028."),
        ("heading", "JURISDICTION AND VENUE"),
        ("body", "3. This Court has subject-matter jurisdiction under 28 U.S.C. "
                 "§ 1332(a) because the parties are citizens of different States and "
                 "the amount in controversy exceeds $75,000.00, exclusive of interest "
                 "and costs."),
        ("body", "4. Venue is proper in this District under 28 U.S.C. § 1391(b)(2) "
                 "because a substantial part of the events giving rise to the claim "
                 "occurred in Philadelphia County, Pennsylvania."),
        ("body", "5. Pennsylvania substantive law governs this action. See Erie R.R. "
                 "Co. v. Tompkins, 304 U.S. 64 (1938)."),
    ],
    [
        ("heading", "FACTS"),
        ("body", "6. On March 14, 2024, at approximately 5:40 p.m., Plaintiff was "
                 "lawfully crossing Market Street at its intersection with 22nd Street "
                 "in Philadelphia, within the marked crosswalk and with a steady WALK "
                 "signal in her favor."),
        ("body", "7. At the same time, Defendant was operating a 2019 Ford F-250 pickup "
                 "truck, New Jersey registration C41-KTR, westbound on Market Street."),
        ("body", "8. Defendant entered the intersection against a steady red signal, in "
                 "violation of 75 Pa.C.S. § 3112(a)(3), and struck Plaintiff with the "
                 "front right corner of the truck."),
        ("body", "9. Plaintiff was taken by ambulance to Schuylkill General Hospital, "
                 "where she was treated for a fracture of the left distal radius, a "
                 "cervical sprain and a laceration above the right eye."),
        ("body", "10. As of May 1, 2024, Plaintiff has incurred medical expenses of "
                 "$48,612.37 and lost wages of $21,400.00, and she continues to "
                 "require physical therapy three times per week."),
        ("heading", "COUNT I - NEGLIGENCE"),
        ("body", "11. Plaintiff incorporates paragraphs 1 through 10 as if fully set "
                 "forth herein."),
        ("body", "12. Defendant owed Plaintiff a duty to operate his vehicle with "
                 "reasonable care. Defendant breached that duty by (a) failing to obey "
                 "a traffic-control signal; (b) failing to keep a proper lookout; "
                 "(c) driving at a speed unsafe for the conditions; and (d) failing to "
                 "yield to a pedestrian lawfully within a crosswalk, 75 Pa.C.S. § 3542."),
        ("body", "13. As a direct and proximate result of Defendant's negligence, "
                 "Plaintiff suffered the injuries and losses described above."),
    ],
    [
        ("heading", "COUNT II - NEGLIGENCE PER SE"),
        ("body", "14. Plaintiff incorporates paragraphs 1 through 13 as if fully set "
                 "forth herein."),
        ("body", "15. Sections 3112 and 3542 of the Vehicle Code were enacted to protect "
                 "pedestrians such as Plaintiff, and Defendant's violation of them "
                 "constitutes negligence per se."),
        ("body", "16. Plaintiff seeks no more than the equal access to the courts that "
                 "every litigant is owed. See Brown v. Board of Education, 347 U.S. 483 "
                 "(1954)."),
        ("heading", "PRAYER FOR RELIEF"),
        ("body", "WHEREFORE, Plaintiff Margaret Smith demands judgment in her favor and "
                 "against Defendant Robert Jones in an amount not less than $250,000.00, "
                 "together with interest, costs of suit, and such other relief as the "
                 "Court deems just."),
        ("heading", "JURY DEMAND"),
        ("body", "Plaintiff demands a trial by jury on all issues so triable."),
        ("gap", ""),
        ("body", "Dated: May 6, 2024"),
        ("body", "Respectfully submitted,"),
        ("block", "\n".join(PLAINTIFF_COUNSEL_BLOCK)),
    ],
]

ANSWER_PAGES = [
    CAPTION + [
        ("center_bold", "ANSWER AND AFFIRMATIVE DEFENSES OF DEFENDANT ROBERT JONES"),
        ("body", "Defendant Robert Jones, by his undersigned counsel, answers the "
                 "Complaint filed on May 6, 2024 as follows:"),
        ("body", "1. Admitted upon information and belief."),
        ("body", "2. Admitted."),
        ("body", "3. - 5. These paragraphs state conclusions of law to which no "
                 "response is required. To the extent a response is required, "
                 "Defendant does not contest jurisdiction or venue."),
        ("body", "6. Denied. After reasonable investigation Defendant is without "
                 "knowledge sufficient to form a belief as to the signal displayed to "
                 "Plaintiff, and strict proof thereof is demanded at trial."),
        ("body", "7. Admitted."),
        ("body", "8. Denied. Defendant entered the intersection on a yellow signal."),
        ("body", "9. - 10. Denied. Defendant lacks knowledge of Plaintiff's injuries "
                 "and of the claimed expenses of $48,612.37 and $21,400.00."),
        ("body", "11. - 16. Denied as conclusions of law."),
    ],
    [
        ("heading", "AFFIRMATIVE DEFENSES"),
        ("body", "First Defense. The Complaint fails to state a claim upon which relief "
                 "can be granted."),
        ("body", "Second Defense. Any recovery is barred or reduced by Plaintiff's own "
                 "comparative negligence under 42 Pa.C.S. § 7102, including her failure "
                 "to look before stepping into the roadway."),
        ("body", "Third Defense. Plaintiff failed to mitigate her damages."),
        ("body", "Fourth Defense. To the extent Plaintiff elected the limited tort "
                 "option, her recovery of non-economic damages is limited by "
                 "75 Pa.C.S. § 1705."),
        ("body", "WHEREFORE, Defendant Robert Jones requests that the Complaint be "
                 "dismissed with prejudice and that judgment be entered in his favor."),
        ("gap", ""),
        ("body", "Dated: June 10, 2024"),
        ("body", "Respectfully submitted,"),
        ("block", "\n".join(DEFENSE_COUNSEL_BLOCK)),
        ("gap", ""),
        ("heading", "CERTIFICATE OF SERVICE"),
        ("body", "I certify that on June 10, 2024 I served this Answer on counsel for "
                 "Plaintiff, Anita R. Patel, Esquire, through the Court's CM/ECF system "
                 "and by e-mail to apatel@patelinjurylaw.example."),
    ],
]

ER_HEADER = [
    ("center_bold", "SCHUYLKILL GENERAL HOSPITAL"),
    ("center", "Emergency Department - 3400 Spruce Street, Philadelphia, PA 19104 - "
               "(215) 555-0190"),
    ("gap", ""),
]

ER_PAGES = [
    ER_HEADER + [
        ("center_bold", "EMERGENCY DEPARTMENT VISIT SUMMARY"),
        ("body", "Patient: SMITH, MARGARET     DOB: 09/22/1981     MRN: 00482913\n"
                 "Date of service: 03/14/2024 18:05     Discharged: 03/14/2024 23:50\n"
                 "Arrival: EMS (Medic 12)     Attending: Laura Chen, MD"),
        ("heading", "Chief complaint"),
        ("body", "Pedestrian struck by pickup truck at low to moderate speed. Left wrist "
                 "pain, neck pain, bleeding from forehead."),
        ("heading", "History of present illness"),
        ("body", "42-year-old female struck at approx. 17:40 while crossing Market St. "
                 "No loss of consciousness reported. Fell onto outstretched left hand. "
                 "Complains of posterior neck pain 6/10 and left wrist pain 8/10."),
        ("heading", "Examination"),
        ("body", "BP 138/86, HR 96, RR 18, SpO2 99% on room air, Temp 98.4 F. "
                 "2.5 cm laceration above the right eyebrow. Tenderness and swelling of "
                 "the left distal forearm; neurovascularly intact. Midline cervical "
                 "tenderness without step-off."),
        ("heading", "Imaging"),
        ("body", "X-ray left wrist: non-displaced fracture of the distal radius.\n"
                 "CT cervical spine: no acute fracture or malalignment.\n"
                 "CT head without contrast: no acute intracranial abnormality."),
    ],
    [
        ("heading", "Diagnoses (ICD-10-CM)"),
        ("body", "S52.502A  Unspecified fracture of the lower end of left radius, "
                 "initial encounter for closed fracture\n"
                 "S13.4XXA  Sprain of ligaments of cervical spine, initial encounter\n"
                 "S01.111A  Laceration without foreign body of right eyelid and "
                 "periocular area, initial encounter\n"
                 "V03.10XA  Pedestrian injured in collision with car, pick-up truck or "
                 "van in traffic accident, initial encounter"),
        ("heading", "Treatment"),
        ("body", "Laceration repaired with 5 sutures (6-0 nylon). Sugar-tong splint "
                 "applied to the left forearm. Soft cervical collar. Ibuprofen 600 mg PO "
                 "and acetaminophen 1,000 mg PO given at 19:10."),
        ("heading", "Disposition and follow-up"),
        ("body", "Discharged home in stable condition with her sister. Orthopaedics "
                 "follow-up within 7 days; suture removal in 5 days; return "
                 "immediately for numbness, worsening pain or headache."),
        ("heading", "Charges"),
        ("mono", "ED visit, level 4 (99284)       $1,985.00\n"
                 "CT head and cervical spine      $3,210.00\n"
                 "X-ray wrist, 3 views              $412.50\n"
                 "Laceration repair, 2.5 cm         $735.00\n"
                 "Splint application                $500.00\n"
                 "Total charges                   $6,842.50"),
        ("gap", ""),
        ("body", "Electronically signed: Laura Chen, MD, 03/14/2024 23:58"),
    ],
]

SEALED_PAGES = [
    ER_HEADER + [
        ("center_bold", "CONFIDENTIAL - FILED UNDER SEAL"),
        ("body", "Smith v. Jones, Case No. " + CASE_NO + ". Produced subject to the "
                 "Stipulated Protective Order entered August 2, 2024."),
        ("heading", "Behavioral health consultation"),
        ("body", "Patient: SMITH, MARGARET     DOB: 09/22/1981     MRN: 00482913\n"
                 "Date of service: 04/18/2024"),
        ("body", "Patient reports intrusive memories of the collision, difficulty "
                 "sleeping and avoidance of the Market Street corridor since "
                 "March 14, 2024. Screening consistent with acute stress reaction. "
                 "Referred for six sessions of trauma-focused therapy."),
        ("body", "Consultant: Priya Raman, PsyD"),
    ],
]

SETTLEMENT_PAGES = [
    [
        ("center_bold", "PATEL INJURY LAW, P.C."),
        ("center", "1500 Walnut Street, Suite 900, Philadelphia, PA 19102 - "
                   "(215) 555-0143"),
        ("gap", ""),
        ("body", "July 15, 2024"),
        ("body", "VIA E-MAIL (dobrien@obrienvoss.example)\n"
                 "Daniel K. O'Brien, Esquire\nO'BRIEN & VOSS LLP"),
        ("heading", f"Re: Smith v. Jones, Case No. {CASE_NO} - Settlement offer"),
        ("body", "Dear Mr. O'Brien:"),
        ("body", "Subject to Fed. R. Evid. 408, Plaintiff Margaret Smith offers to "
                 "resolve all claims against your client for $185,000.00, inclusive "
                 "of costs and fees. Her medical expenses now exceed $52,000.00 and she "
                 "remains in physical therapy."),
        ("body", "This offer remains open until 5:00 p.m. on August 15, 2024."),
        ("body", "Very truly yours,"),
        ("block", "\n".join(PLAINTIFF_COUNSEL_BLOCK[:3])),
    ],
]

LETTER_BODY = f"""\
Dan,

Following our call last week, attached is Plaintiff's settlement offer in
Smith v. Jones, Case No. {CASE_NO} (E.D. Pa.).

In short: $185,000.00, open until August 15, 2024. The updated medical
specials are enclosed with the offer. Please confirm receipt.

Best regards,
Anita

Anita R. Patel, Esquire
PATEL INJURY LAW, P.C.
1500 Walnut Street, Suite 900, Philadelphia, PA 19102
Tel: (215) 555-0143
"""

CALL_NOTES = f"""\
CALL NOTES - Smith v. Jones, Case No. {CASE_NO}
Date: 2024-07-02, 14:10-14:35
Participants: Anita R. Patel (counsel), Margaret Smith (client)

- Client confirms she was walking back from the café on the corner of
  22nd & Market when the truck hit her. Barista Zoë Nguyen saw it happen;
  client has her cell number: (267) 555-0121.
- Client asked whether she can sue the city under 42 U.S.C. § 1983 because
  the signal timing is "too short". Explained § 1983 needs a state actor and a
  constitutional violation; a signal-timing claim would be negligence against
  the City, with notice under 42 Pa.C.S. § 5522 (six months). Not pursuing.
- Physical therapy continues 3x/week; new bills about $3,600.00 since May.
- Client agrees to a settlement demand of $185,000.00. Send by 2024-07-15.

Follow-up: request PT records; send demand letter; calendar 2024-08-15.
"""

INTERROGATORIES = [
    "State your full name, every address at which you have resided during the past "
    "five years, your date of birth and your driver's license number and issuing State.",
    "Describe in detail how the collision of March 14, 2024 occurred, including your "
    "speed, your direction of travel and the color of the traffic signal facing you "
    "when you first saw it and when you entered the intersection.",
    "Identify every person who witnessed the collision or its immediate aftermath, "
    "including name, address, telephone number and e-mail address.",
    "State whether you were using a mobile telephone or any other electronic device "
    "at any time within five minutes before the collision and, if so, identify the "
    "device, the carrier and the nature of the use.",
    "Identify every policy of liability insurance that may cover the claims in this "
    "action, stating the insurer, the policy number and the limits of coverage.",
    "Identify every document that you contend supports any affirmative defense "
    "asserted in your Answer dated June 10, 2024.",
]

DEFINITIONS = [
    ("Term", "Meaning"),
    ("\"You\" / \"Defendant\"", "Defendant Robert Jones and anyone acting on his behalf."),
    ("\"Collision\"", "The incident of March 14, 2024 at Market Street and 22nd Street, "
                      "Philadelphia, PA, described in the Complaint."),
    ("\"Vehicle\"", "The 2019 Ford F-250, New Jersey registration C41-KTR."),
    ("\"Identify\" (person)", "State the full name, last known address, telephone "
                              "number and e-mail address."),
]

# Deposition transcript excerpt (rendered as page images, no text layer).
# Each page: (page number in the transcript, 25 numbered lines).
DEPOSITION_PAGES = [
    (14, [
        "          ROBERT JONES - June 3, 2024",
        "     Q.  Mr. Jones, where were you coming from",
        "that evening?",
        "     A.  From a job site in Conshohocken.",
        "     Q.  How long had you been driving?",
        "     A.  About forty minutes.",
        "     Q.  Were you on your phone at any point?",
        "     A.  No. It was in the cup holder.",
        "     Q.  What color was the light when you first",
        "saw it?",
        "     A.  Green. Then it turned yellow.",
        "     Q.  How far from the intersection were you",
        "when it turned yellow?",
        "     A.  Maybe two, three car lengths.",
        "     Q.  Did you brake?",
        "     A.  I took my foot off the gas. I thought I",
        "could make it.",
        "     Q.  Did you see Mrs. Smith before the impact?",
        "     A.  Not until she was right in front of the",
        "truck.",
        "     Q.  Was she in the crosswalk?",
        "          MR. O'BRIEN:  Objection to form.",
        "     A.  I think so. I'm not sure.",
        "     Q.  How fast were you going?",
        "     A.  Twenty-five, maybe thirty.",
    ]),
    (15, [
        "     Q.  What is the speed limit on that block?",
        "     A.  Twenty-five.",
        "     Q.  After the impact, what did you do?",
        "     A.  I stopped and called 911 right away.",
        "     Q.  Did you speak with the police officer?",
        "     A.  Yes, Officer Delgado.",
        "     Q.  Did you tell Officer Delgado that the",
        "light was red?",
        "          MR. O'BRIEN:  Objection. Go ahead.",
        "     A.  I said it might have been red by then.",
        "I was upset.",
        "     Q.  Were you issued a citation?",
        "     A.  Yes. For the signal.",
        "     Q.  Did you pay it?",
        "     A.  I paid it, $150.00. I didn't want to",
        "take off work to fight it.",
        "     Q.  Who owns the truck?",
        "     A.  I do. It's my own truck.",
        "     Q.  Were you working for anyone that day?",
        "     A.  For myself. I do small hauling jobs.",
        "          MS. PATEL:  Let's take five minutes.",
        "          (Recess taken, 11:42 a.m.)",
        "",
        "",
        "",
    ]),
]

# --------------------------------------------------------------------------
# Builders (each returns bytes)
# --------------------------------------------------------------------------


class _CasePDF(FPDF):
    """Letter-size fpdf2 document with a fixed producer and a page footer."""

    footer_label = ""

    def footer(self) -> None:
        self.set_y(-15)
        self.set_font("Times", "", 9)
        self.cell(0, 10, f"{self.footer_label}  -  Page {self.page_no()} of {{nb}}",
                  align="C")


def build_text_pdf(pages: list[list[tuple[str, str]]], *, title: str, author: str,
                   created: datetime, footer: str) -> bytes:
    """A text PDF with exactly len(pages) pages (core font Times, no embedding)."""
    pdf = _CasePDF(format="Letter", unit="mm")
    pdf.footer_label = footer
    pdf.set_creation_date(created)
    pdf.set_title(title)
    pdf.set_author(author)
    pdf.set_creator("docimport examples/make_sample_case.py")
    pdf.set_producer("docimport sample-case generator")
    pdf.set_margins(25, 22, 25)
    pdf.set_auto_page_break(True, margin=22)
    for page_no, items in enumerate(pages, start=1):
        pdf.add_page()
        for style, text in items:
            if style == "gap":
                pdf.ln(4)
                continue
            bold = style in ("center_bold", "right_bold", "heading")
            if style == "mono":  # fixed-width columns, e.g. a table of charges
                pdf.set_font("Courier", "", 11)
            else:
                pdf.set_font("Times", "B" if bold else "", 12)
            align = {"center_bold": "C", "center": "C", "right_bold": "R"}.get(style, "J")
            if style == "mono" or (style in ("heading", "block", "body") and "\n" in text):
                align = "L"
            if style == "heading":
                pdf.ln(2)
            pdf.multi_cell(0, 5.6, text, align=align, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(1.6)
        if pdf.page_no() != page_no:
            raise RuntimeError(f"{title}: text meant for page {page_no} overflowed")
    return bytes(pdf.output())


def build_complaint() -> bytes:
    return build_text_pdf(COMPLAINT_PAGES, title=f"Complaint - Smith v. Jones, {CASE_NO}",
                          author="Anita R. Patel", footer="COMPLAINT",
                          created=datetime(2024, 5, 6, 9, 15, tzinfo=EDT))


def build_answer() -> bytes:
    return build_text_pdf(ANSWER_PAGES, title=f"Answer - Smith v. Jones, {CASE_NO}",
                          author="Daniel K. O'Brien", footer="ANSWER",
                          created=datetime(2024, 6, 10, 16, 2, tzinfo=EDT))


def build_er_summary() -> bytes:
    return build_text_pdf(ER_PAGES, title="ED Visit Summary - SMITH, MARGARET",
                          author="Schuylkill General Hospital",
                          footer="SMITH, MARGARET - MRN 00482913",
                          created=datetime(2024, 3, 14, 23, 58, tzinfo=EDT))


def build_settlement_offer() -> bytes:
    return build_text_pdf(SETTLEMENT_PAGES, title="Settlement offer - Smith v. Jones",
                          author="Anita R. Patel", footer="FRE 408 - CONFIDENTIAL",
                          created=datetime(2024, 7, 15, 10, 20, tzinfo=EDT))


def build_sealed_records() -> bytes:
    plain = build_text_pdf(SEALED_PAGES, title="Sealed behavioral health record",
                           author="Schuylkill General Hospital",
                           footer="CONFIDENTIAL - FILED UNDER SEAL",
                           created=datetime(2024, 4, 18, 15, 30, tzinfo=EDT))
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(plain)))
    # fpdf2 derived the file ID from the content, so it is already fixed and the
    # clone carries it over. encrypt() keeps ID[0] (the only part the RC4 key
    # depends on) but replaces ID[1] with random bytes; put the fixed one back.
    # (AES would also draw a random IV per stream, so RC4-128 is used.)
    fixed_id = ByteStringObject(hashlib.md5(plain).digest())
    writer._ID = ArrayObject([fixed_id, fixed_id])
    writer.encrypt(user_password=SEALED_PASSWORD,
                   owner_password=SEALED_PASSWORD + "-owner", algorithm="RC4-128")
    writer._ID = ArrayObject([fixed_id, fixed_id])
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def build_corrupt_scan() -> bytes:
    """A PDF header and the start of an image object, then truncated garbage."""
    head = (
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
        b"1 0 obj\n<< /Type /XObject /Subtype /Image /Width 1700 /Height 2200\n"
        b"   /ColorSpace /DeviceGray /BitsPerComponent 8 /Filter /DCTDecode\n"
        b"   /Length 48213 >>\nstream\n"
    )
    # Deterministic pseudo-random bytes: a SHA-256 counter stream.
    garbage = b"".join(hashlib.sha256(b"corrupt_scan %d" % i).digest() for i in range(128))
    return head + garbage  # cut mid-stream: no endstream, xref or trailer


def _draw_text_image(size: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", size, 255)
    return img, ImageDraw.Draw(img)


def build_deposition_scan() -> bytes:
    """Image-only PDF: 200 dpi, 1-bit (CCITT G4) letter pages, no text layer."""
    dpi = 200
    width, height = int(8.5 * dpi), int(11 * dpi)
    font = ImageFont.load_default(size=34)  # Pillow's bundled TrueType font
    small = ImageFont.load_default(size=28)
    left_num, left_text, top, step = 150, 250, 260, 66
    pages = []
    for page_no, lines in DEPOSITION_PAGES:
        img, draw = _draw_text_image((width, height))
        draw.text((width - 150, 120), f"Page {page_no}", font=font, fill=0, anchor="ra")
        for i, line in enumerate(lines, start=1):
            y = top + (i - 1) * step
            draw.text((left_num + 50, y), str(i), font=font, fill=0, anchor="ra")
            if line:
                if left_text + draw.textlength(line, font=font) > width - 150:
                    raise RuntimeError(f"deposition line too long: {line!r}")
                draw.text((left_text, y), line, font=font, fill=0)
        draw.line((left_text - 25, top - 30, left_text - 25, top + 25 * step), fill=0, width=2)
        draw.text((width // 2, height - 160),
                  "KEYSTONE COURT REPORTING  (215) 555-0166", font=small, fill=0,
                  anchor="ma")
        pages.append(img.point(lambda v: 255 if v >= 128 else 0).convert("1"))
    fixed = time.gmtime(int(datetime(2024, 6, 12, 14, 0, tzinfo=timezone.utc).timestamp()))
    out = io.BytesIO()
    pages[0].save(out, "PDF", save_all=True, append_images=pages[1:], resolution=float(dpi),
                  title="Deposition of Robert Jones (excerpt)", author="Keystone Court Reporting",
                  creator="scanner", producer="scanner",
                  creationDate=fixed, modDate=fixed)
    return out.getvalue()


def build_site_photo() -> bytes:
    """Small PNG: a drawn intersection with crosswalks, vehicles and a caption."""
    w, h = 480, 320
    img = Image.new("RGB", (w, h), (92, 140, 80))  # grass
    d = ImageDraw.Draw(img)
    road = (70, 70, 74)
    d.rectangle((0, 95, w, 195), fill=road)          # Market St (east-west)
    d.rectangle((190, 0, 290, 280), fill=road)       # 22nd St (north-south)
    for x in range(196, 290, 14):                    # crosswalk, west side
        d.rectangle((x, 198, x + 7, 226), fill=(235, 235, 235))
    for y in range(100, 195, 14):                    # crosswalk, east side
        d.rectangle((293, y, 321, y + 7), fill=(235, 235, 235))
    d.line((0, 145, 185, 145), fill=(230, 200, 40), width=3)
    d.line((325, 145, w, 145), fill=(230, 200, 40), width=3)
    d.rectangle((350, 110, 430, 140), fill=(180, 30, 30), outline=(20, 20, 20))  # truck
    d.rectangle((352, 114, 372, 136), fill=(150, 190, 220))
    d.line((430, 125, 470, 125), fill=(25, 25, 25), width=2)  # skid mark
    d.ellipse((300, 206, 316, 222), fill=(240, 120, 20), outline=(20, 20, 20))  # marker
    d.rectangle((150, 40, 166, 86), fill=(30, 30, 30))        # signal head
    for i, colour in enumerate([(220, 40, 40), (90, 70, 20), (30, 70, 30)]):
        d.ellipse((152, 42 + i * 15, 164, 54 + i * 15), fill=colour)
    d.rectangle((0, 280, w, h), fill=(255, 255, 255))
    font = ImageFont.load_default(size=15)
    d.text((8, 284), "Market St & 22nd St, Philadelphia - looking north", font=font,
           fill=(0, 0, 0))
    d.text((8, 301), "Photo 3 of 12, taken 03/15/2024 by A. Patel", font=font,
           fill=(0, 0, 0))
    out = io.BytesIO()
    img.save(out, "PNG", optimize=True)
    return out.getvalue()


ZIP_DATE = (2024, 5, 20, 9, 0, 0)


def _normalise_zip(data: bytes) -> bytes:
    """Rewrite a ZIP with fixed timestamps and attributes, keeping member order."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=ZIP_DATE)
            fixed.compress_type = zipfile.ZIP_DEFLATED
            fixed.create_system = 0
            fixed.external_attr = 0
            dst.writestr(fixed, src.read(info.filename))
    return out.getvalue()


def build_interrogatories() -> bytes:
    doc = docx.Document()
    style = doc.styles["Normal"]
    style.font.name = "Times New Roman"
    style.font.size = Pt(12)
    for line in ("UNITED STATES DISTRICT COURT", "FOR THE EASTERN DISTRICT OF PENNSYLVANIA"):
        p = doc.add_paragraph()
        p.alignment = 1
        p.add_run(line).bold = True
    doc.add_paragraph(f"MARGARET SMITH, Plaintiff, v. ROBERT JONES, Defendant.\t"
                      f"Case No. {CASE_NO}")
    doc.add_heading("PLAINTIFF'S FIRST SET OF INTERROGATORIES DIRECTED TO "
                    "DEFENDANT ROBERT JONES", level=1)
    doc.add_paragraph(
        "Pursuant to Federal Rule of Civil Procedure 33, Plaintiff Margaret Smith "
        "requests that Defendant Robert Jones answer the following interrogatories "
        "separately and fully, in writing and under oath, and serve the answers on "
        "undersigned counsel within thirty (30) days of service, that is, on or before "
        "August 19, 2024.")
    doc.add_heading("Definitions", level=2)
    table = doc.add_table(rows=len(DEFINITIONS), cols=2)
    table.style = "Table Grid"
    for row, (term, meaning) in zip(table.rows, DEFINITIONS):
        row.cells[0].text = term
        row.cells[1].text = meaning
    for cell in table.rows[0].cells:
        cell.paragraphs[0].runs[0].bold = True
    doc.add_heading("Interrogatories", level=2)
    for number, text in enumerate(INTERROGATORIES, start=1):
        p = doc.add_paragraph()
        p.add_run(f"INTERROGATORY NO. {number}: ").bold = True
        p.add_run(text)
        doc.add_paragraph("ANSWER:")
    doc.add_paragraph("Dated: July 18, 2024")
    doc.add_paragraph("\n".join(PLAINTIFF_COUNSEL_BLOCK))

    props = doc.core_properties
    props.title = "Plaintiff's First Set of Interrogatories - Smith v. Jones"
    props.author = "Anita R. Patel"
    props.last_modified_by = "Anita R. Patel"
    props.comments = ""
    props.subject = f"Case No. {CASE_NO}"
    props.revision = 3
    props.created = datetime(2024, 7, 17, 14, 0, tzinfo=timezone.utc)
    props.modified = datetime(2024, 7, 18, 13, 30, tzinfo=timezone.utc)
    out = io.BytesIO()
    doc.save(out)
    return _normalise_zip(out.getvalue())


def build_letter_eml() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Anita R. Patel <apatel@patelinjurylaw.example>"
    msg["To"] = "Daniel K. O'Brien <dobrien@obrienvoss.example>"
    msg["Cc"] = "Margaret Smith <msmith.home@mail.example>"
    msg["Subject"] = f"Smith v. Jones, No. {CASE_NO} - settlement offer"
    msg["Date"] = format_datetime(datetime(2024, 7, 15, 10, 32, 0, tzinfo=EDT))
    msg["Message-ID"] = "<20240715143200.4F2A1C@patelinjurylaw.example>"
    msg.set_content(LETTER_BODY)
    msg.add_attachment(build_settlement_offer(), maintype="application", subtype="pdf",
                       filename="settlement_offer.pdf")
    # Without an explicit boundary the generator picks a random one.
    msg.set_boundary("===============docimport-sample-0001==")
    return msg.as_bytes(policy=policy.SMTP)  # CRLF line endings, as on the wire


def build_all() -> dict[str, bytes]:
    er = build_er_summary()
    files = {
        "pleadings/complaint.pdf": build_complaint(),
        "pleadings/answer.pdf": build_answer(),
        "discovery/interrogatories.docx": build_interrogatories(),
        "discovery/scanned_deposition_excerpt.pdf": build_deposition_scan(),
        "discovery/site_photo.png": build_site_photo(),
        "correspondence/letter_to_counsel.eml": build_letter_eml(),
        "correspondence/call_notes.txt": CALL_NOTES.encode("utf-8"),
        "medical_records/er_visit_summary.pdf": er,
        "medical_records/er_visit_summary_copy.pdf": er,
        "medical_records/corrupt_scan.pdf": build_corrupt_scan(),
        "medical_records/sealed_records.pdf": build_sealed_records(),
    }
    assert set(files) == set(EXPECTED), "EXPECTED and build_all() disagree"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder (default: examples/sample-case next to this script)")
    parser.add_argument("--check", action="store_true",
                        help="don't write; exit 1 if the folder differs from a fresh "
                             "generation")
    args = parser.parse_args(argv)
    out: Path = args.out
    files = build_all()

    existing = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} \
        if out.is_dir() else set()
    strays = sorted(existing - set(files))
    if args.check:
        bad = strays + sorted(rel for rel, data in files.items()
                              if rel not in existing or (out / rel).read_bytes() != data)
        for rel in bad:
            print(f"differs: {rel}", file=sys.stderr)
        return 1 if bad else 0
    if strays:
        print(f"{out} holds files this script does not generate; delete them first:",
              file=sys.stderr)
        for rel in strays:
            print(f"  {rel}", file=sys.stderr)
        return 1
    for rel, data in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    total = sum(len(d) for d in files.values())
    print(f"wrote {len(files)} files, {total:,} bytes, to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
