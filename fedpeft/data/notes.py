"""Deterministic generator of synthetic clinical notes for referral-specialty triage.

Learnable but not trivial on purpose: symptoms overlap across specialties, notes carry negated
findings and distracting comorbidities, abbreviations and typos, some labels are flipped, and
each site writes in its own style (a cardiology centre and a children's hospital do not write
alike) with its own class mix. See docs/data.md for the data card.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LABELS: list[str] = [
    "cardiology", "pulmonology", "neurology", "gastroenterology",
    "orthopedics", "dermatology", "endocrinology",
]

# Per class: (plain wording, clinical wording, abbreviation or '', paediatric wording).
SYMPTOMS: dict[str, list[tuple[str, str, str, str]]] = {
    "cardiology": [
        ("chest pain", "retrosternal chest pain", "CP", "chest hurting"),
        ("racing heart", "palpitations", "palps", "heart beating fast"),
        ("swollen ankles", "bilateral pedal oedema", "pedal edema", "puffy feet"),
        ("fainting", "syncope", "syncope", "passed out"),
        ("pain radiating to left arm", "exertional angina", "angina", "arm pain when running"),
        ("irregular pulse", "irregularly irregular pulse", "AF", "funny heartbeat"),
    ],
    "pulmonology": [
        ("shortness of breath", "dyspnoea", "SOB", "breathing fast"),
        ("wheezing", "expiratory wheeze", "wheeze", "wheezy chest"),
        ("coughing up blood", "haemoptysis", "hemoptysis", "blood when coughing"),
        ("persistent cough", "chronic productive cough", "cough", "cough that won't stop"),
        ("chest tightness on breathing", "pleuritic chest pain", "pleuritic CP", "hurts to breathe"),
        ("snoring and pauses in breathing", "witnessed apnoeas", "OSA sx", "stops breathing at night"),
    ],
    "neurology": [
        ("bad headache", "severe cephalgia", "HA", "head hurting"),
        ("numbness in one arm", "unilateral paraesthesia", "paresthesia", "tingly arm"),
        ("seizure", "generalised tonic-clonic seizure", "GTC sz", "had a fit"),
        ("slurred speech", "dysarthria", "dysarthria", "talking funny"),
        ("drooping face", "facial droop", "facial droop", "face looks droopy"),
        ("memory problems", "cognitive decline", "memory loss", "forgetting things"),
    ],
    "gastroenterology": [
        ("stomach pain", "epigastric pain", "abd pain", "tummy ache"),
        ("vomiting", "emesis", "N/V", "throwing up"),
        ("black stools", "melaena", "melena", "dark poo"),
        ("diarrhoea", "loose stools", "diarrhea", "runny poo"),
        ("heartburn", "reflux", "GERD sx", "burning in tummy"),
        ("yellow eyes", "jaundice", "jaundice", "yellow skin"),
    ],
    "orthopedics": [
        ("knee pain", "knee effusion", "knee pain", "sore knee"),
        ("back pain", "lumbar back pain", "LBP", "back hurting"),
        ("swollen wrist after fall", "distal radius tenderness", "wrist inj", "hurt wrist falling"),
        ("stiff shoulder", "reduced shoulder range of motion", "shoulder ROM", "can't lift arm"),
        ("limping", "antalgic gait", "antalgic gait", "limping"),
        ("hip pain", "hip pain on weight bearing", "hip pain", "sore hip"),
    ],
    "dermatology": [
        ("itchy rash", "pruritic rash", "rash", "itchy spots"),
        ("changing mole", "pigmented lesion with irregular border", "atypical naevus", "mole got bigger"),
        ("scaly patches", "psoriatic plaques", "plaques", "flaky skin"),
        ("blisters", "vesicular eruption", "vesicles", "blisters"),
        ("red swollen skin", "cellulitis", "cellulitis", "red hot skin"),
        ("hair loss", "alopecia", "alopecia", "hair falling out"),
    ],
    "endocrinology": [
        ("always thirsty", "polydipsia", "polydipsia", "drinking lots"),
        ("passing lots of urine", "polyuria", "polyuria", "weeing a lot"),
        ("high sugar", "hyperglycaemia", "high BG", "high sugar"),
        ("neck swelling", "goitre", "goiter", "lump in neck"),
        ("heat intolerance", "heat intolerance and tremor", "thyrotoxic sx", "always too hot"),
        ("weight gain and feeling cold", "hypothyroid features", "hypothyroid sx", "always cold"),
    ],
}

# Shared by several specialties: these are what make the task ambiguous.
SHARED: list[tuple[str, str, str, str]] = [
    ("tiredness", "fatigue", "fatigue", "tired all the time"),
    ("dizziness", "presyncope", "dizzy", "dizzy"),
    ("nausea", "nausea", "nausea", "feeling sick"),
    ("fever", "pyrexia", "febrile", "hot to touch"),
    ("weight loss", "unintentional weight loss", "wt loss", "not growing"),
    ("pain", "generalised pain", "pain", "hurting"),
]

HISTORY: dict[str, list[str]] = {
    "cardiology": ["hypertension", "prior MI", "HTN", "high cholesterol"],
    "pulmonology": ["asthma", "COPD", "smoker 30 pack-years", "TB contact"],
    "neurology": ["migraine", "epilepsy", "prior TIA", "MS"],
    "gastroenterology": ["GORD", "alcohol excess", "IBD", "gallstones"],
    "orthopedics": ["osteoarthritis", "prior fracture", "osteoporosis", "gout"],
    "dermatology": ["eczema", "sunburn history", "psoriasis", "fair skin"],
    "endocrinology": ["type 2 diabetes", "DM2", "thyroid disease", "obesity"],
}


@dataclass(frozen=True)
class SiteStyle:
    """How a site writes: wording register, abbreviation and typo rates, and its specialty focus."""

    name: str
    register: int  # 0 plain, 1 clinical, 2 abbreviations, 3 paediatric
    abbrev_rate: float
    typo_rate: float
    focus: str | None  # specialty over-represented in the class mix
    paediatric: bool = False


ARCHETYPES: list[SiteStyle] = [
    SiteStyle("general hospital", 0, 0.15, 0.01, None),
    SiteStyle("cardiology centre", 2, 0.70, 0.01, "cardiology"),
    SiteStyle("children's hospital", 3, 0.05, 0.02, None, paediatric=True),
    SiteStyle("academic centre", 1, 0.20, 0.00, "neurology"),
    SiteStyle("rural clinic", 0, 0.30, 0.06, "orthopedics"),
    SiteStyle("emergency department", 2, 0.60, 0.03, None),
    SiteStyle("respiratory unit", 1, 0.40, 0.01, "pulmonology"),
    SiteStyle("diabetes clinic", 0, 0.35, 0.02, "endocrinology"),
]


def site_style(site: int) -> SiteStyle:
    return ARCHETYPES[site % len(ARCHETYPES)]


def _phrase(rng: np.random.Generator, options: tuple[str, str, str, str], style: SiteStyle) -> str:
    if style.paediatric and rng.random() < 0.7:
        return options[3]
    if options[2] and rng.random() < style.abbrev_rate:
        return options[2]
    idx = style.register if style.register < 2 else int(rng.integers(0, 2))
    if rng.random() < 0.25:  # every site mixes registers a little
        idx = int(rng.integers(0, 3))
    return options[idx] or options[0]


def _typos(rng: np.random.Generator, text: str, rate: float) -> str:
    if rate <= 0:
        return text
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) > 3 and rng.random() < rate:
            j = int(rng.integers(0, len(w) - 1))
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:] if rng.random() < 0.5 else w[:j] + w[j + 1:]
    return " ".join(words)


def _demographics(rng: np.random.Generator, style: SiteStyle) -> str:
    if style.paediatric:
        age = int(rng.integers(1, 16))
        who = rng.choice(["boy", "girl"])
        carer = rng.choice(["mother", "father", "grandmother"])
        return f"{age} year old {who} brought in by {carer} with"
    age = int(rng.integers(18, 90))
    sex = rng.choice(["M", "F"]) if style.register == 2 else rng.choice(["man", "woman"])
    if style.register == 2:
        return f"{age}{sex} pt c/o"
    return f"{age} year old {sex} presenting with"


def generate_note(rng: np.random.Generator, label: int, style: SiteStyle) -> str:
    """One note for class ``label`` written in ``style``."""
    return note_and_finding(rng, label, style)[0]


def note_and_finding(rng: np.random.Generator, label: int, style: SiteStyle) -> tuple[str, str]:
    """One note, and its first core finding in clinical wording (the referral's reason)."""
    cls = LABELS[label]
    others = [c for c in LABELS if c != cls]
    n_core = 1 if rng.random() < 0.35 else int(rng.integers(2, 4))
    idx = rng.choice(len(SYMPTOMS[cls]), size=n_core, replace=False)
    findings = [_phrase(rng, SYMPTOMS[cls][i], style) for i in idx]
    if rng.random() < 0.6:
        findings.append(_phrase(rng, SHARED[int(rng.integers(len(SHARED)))], style))
    if rng.random() < 0.35:  # a real finding from another specialty (comorbid or misleading)
        other = others[int(rng.integers(len(others)))]
        findings.append(_phrase(rng, SYMPTOMS[other][int(rng.integers(6))], style))
    rng.shuffle(findings)
    parts = [f"{_demographics(rng, style)} {', '.join(findings)}."]
    if rng.random() < 0.5:  # negated findings of other specialties
        other = others[int(rng.integers(len(others)))]
        neg = _phrase(rng, SYMPTOMS[other][int(rng.integers(6))], style)
        parts.append(rng.choice([f"Denies {neg}.", f"No {neg}.", f"Not {neg}.", f"neg for {neg}."]))
    if rng.random() < 0.5:  # history: usually own specialty, often not
        hcls = cls if rng.random() < 0.5 else others[int(rng.integers(len(others)))]
        hist = HISTORY[hcls][int(rng.integers(4))]
        parts.append(rng.choice([f"PMH {hist}.", f"Background of {hist}.", f"Hx: {hist}."]))
    if rng.random() < 0.3:
        parts.append(rng.choice(["Onset 2 days ago.", "Symptoms for weeks.", "Worse at night.", "GP referral."]))
    return _typos(rng, " ".join(parts), style.typo_rate), SYMPTOMS[cls][int(idx[0])][1]


def class_mix(rng: np.random.Generator, style: SiteStyle, alpha: float) -> np.ndarray:
    """Label skew: Dirichlet(alpha) proportions, tilted toward the site's specialty focus."""
    p = rng.dirichlet(np.full(len(LABELS), alpha))
    if style.focus is not None:
        p = 0.6 * p + 0.4 * np.eye(len(LABELS))[LABELS.index(style.focus)]
    return p / p.sum()


def generate_notes(
    *, n: int, seed: int, style: SiteStyle | None = None, mix: np.ndarray | None = None,
    label_noise: float = 0.0,
) -> tuple[list[str], list[int]]:
    """``n`` notes and labels. ``style=None`` draws a style per note (a global, mixed test set)."""
    texts, labels, _ = notes_with_findings(n=n, seed=seed, style=style, mix=mix, label_noise=label_noise)
    return texts, labels


def notes_with_findings(
    *, n: int, seed: int, style: SiteStyle | None = None, mix: np.ndarray | None = None,
    label_noise: float = 0.0,
) -> tuple[list[str], list[int], list[str]]:
    """``generate_notes`` plus each note's key finding (same notes for the same arguments)."""
    rng = np.random.default_rng(seed)
    mix = np.full(len(LABELS), 1 / len(LABELS)) if mix is None else mix
    texts: list[str] = []
    labels: list[int] = []
    findings: list[str] = []
    for _ in range(n):
        y = int(rng.choice(len(LABELS), p=mix))
        st = style or ARCHETYPES[int(rng.integers(len(ARCHETYPES)))]
        text, finding = note_and_finding(rng, y, st)
        texts.append(text)
        findings.append(finding)
        if label_noise > 0 and rng.random() < label_noise:
            y = int((y + rng.integers(1, len(LABELS))) % len(LABELS))
        labels.append(y)
    return texts, labels, findings
