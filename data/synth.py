"""A deterministic generator of realistic e-commerce click logs, for demos and tests.

Product titles are composed from categories, brands and attributes the way shops write them;
queries are what shoppers type (a subset of the attributes, synonyms, brand nicknames, model
numbers without dashes, shuffled words, typos); clicks follow a Zipf law over popularity, so
one batch often holds the same product twice. ``generate`` writes ``train.jsonl``,
``catalog.jsonl`` and ``eval.jsonl`` (held-out queries with graded relevance: 3 the intended
product, 2 another product matching everything the query says, 1 same kind missing an
attribute); options add an "image" feature vector per product (``add_image_features``), cold
products no training pair clicks, and per-click training signals (``training_signals``: hard
negatives, an engagement grade, judged exclusions, teacher scores). More: docs/data.md.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clicktower.data.errors import DataError

# Attribute pools: canonical catalog spelling -> what shoppers type instead.
COLOURS = {
    "Black": ["black"], "White": ["white"], "Gray": ["grey", "gray"], "Navy Blue": ["navy", "dark blue"],
    "Red": ["red"], "Beige": ["tan", "beige", "cream"], "Green": ["green", "olive"],
    "Brushed Nickel": ["nickel", "brushed nickel", "satin nickel"], "Oil-Rubbed Bronze": ["bronze", "orb"],
    "Matte Black": ["matte black", "flat black"], "Yellow": ["yellow"], "Walnut": ["walnut", "dark wood"],
}
MATERIALS = {
    "Stainless Steel": ["stainless", "steel", "ss"], "Solid Oak": ["oak", "oak wood"],
    "Cast Iron": ["cast iron", "iron"], "Polyester": ["polyester", "fabric"], "Leather": ["leather"],
    "Ceramic": ["ceramic", "porcelain"], "Aluminum": ["aluminum", "aluminium", "alu"],
    "Tempered Glass": ["glass", "tempered glass"], "Vinyl": ["vinyl", "pvc"], "Bamboo": ["bamboo"],
}


@dataclass(frozen=True)
class Category:
    """One kind of product: its catalog noun, shopper synonyms and attribute axes."""

    noun: str
    synonyms: tuple[str, ...]
    attributes: dict[str, dict[str, list[str]]] = field(hash=False)


CATEGORIES = [
    Category("Sofa", ("couch", "sofa", "settee"), {
        "colour": COLOURS, "material": {k: MATERIALS[k] for k in ("Polyester", "Leather")},
        "size": {"3-Seat": ["3 seat", "three seater"], "Loveseat": ["loveseat", "2 seater", "small couch"],
                 "Sectional": ["sectional", "l shaped", "corner couch"]}}),
    Category("Cordless Drill Driver", ("drill", "cordless drill", "power drill", "driver drill"), {
        "colour": {k: COLOURS[k] for k in ("Black", "Yellow", "Red", "Green")},
        "voltage": {"12V": ["12v", "12 volt"], "18V": ["18v", "18 volt"], "20V MAX": ["20v", "20 volt"]},
        "motor": {"Brushless": ["brushless"], "Brushed": ["brushed", "standard"]}}),
    Category("Kitchen Faucet", ("faucet", "kitchen tap", "sink faucet", "mixer tap"), {
        "colour": {k: COLOURS[k] for k in ("Brushed Nickel", "Oil-Rubbed Bronze", "Matte Black", "White")},
        "style": {"Pull-Down": ["pull down", "pulldown"], "Single-Handle": ["single handle", "one handle"],
                  "Touchless": ["touchless", "motion sensor", "hands free"]}}),
    Category("Dining Table", ("dining table", "kitchen table", "table"), {
        "material": {k: MATERIALS[k] for k in ("Solid Oak", "Tempered Glass", "Bamboo", "Aluminum")},
        "colour": {k: COLOURS[k] for k in ("Walnut", "White", "Black", "Gray")},
        "size": {"4-Person": ["4 person", "four seat", "small"], "6-Person": ["6 person", "six seater"],
                 "8-Person": ["8 person", "large", "eight seat"]}}),
    Category("Area Rug", ("rug", "area rug", "carpet"), {
        "colour": COLOURS, "material": {k: MATERIALS[k] for k in ("Polyester", "Bamboo", "Vinyl")},
        "size": {"5 ft. x 7 ft.": ["5x7", "5 x 7"], "8 ft. x 10 ft.": ["8x10", "8 x 10"],
                 "2 ft. x 3 ft.": ["2x3", "small rug", "doormat size"]}}),
    Category("Ceiling Fan", ("ceiling fan", "fan", "fan light"), {
        "colour": {k: COLOURS[k] for k in ("Brushed Nickel", "Oil-Rubbed Bronze", "Matte Black", "White")},
        "size": {"52 in.": ['52"', "52 inch"], "44 in.": ['44"', "44 inch"], "60 in.": ['60"', "60 inch"]},
        "feature": {"with LED Light Kit": ["with light", "led"], "with Remote": ["remote", "remote control"],
                    "Outdoor": ["outdoor", "patio", "wet rated"]}}),
    Category("Cookware Set", ("pots and pans", "cookware", "pan set"), {
        "material": {k: MATERIALS[k] for k in ("Stainless Steel", "Cast Iron", "Ceramic", "Aluminum")},
        "size": {"10-Piece": ["10 piece", "10pc"], "5-Piece": ["5 piece", "5pc"], "15-Piece": ["15 piece", "15pc"]},
        "feature": {"Nonstick": ["nonstick", "non stick", "teflon"], "Induction Ready": ["induction"],
                    "Dishwasher Safe": ["dishwasher safe"]}}),
    Category("Table Lamp", ("lamp", "table lamp", "bedside lamp", "desk light"), {
        "colour": COLOURS, "material": {k: MATERIALS[k] for k in ("Ceramic", "Tempered Glass", "Aluminum", "Bamboo")},
        "feature": {"with USB Port": ["usb", "usb charging"], "Dimmable": ["dimmable", "dimmer"],
                    "Touch Control": ["touch", "touch lamp"]}}),
    Category("Circular Saw", ("circular saw", "skill saw", "saw"), {
        "voltage": {"18V": ["18v", "cordless"], "15 Amp Corded": ["corded", "15 amp"], "20V MAX": ["20v"]},
        "size": {'7-1/4 in.': ["7 1/4", '7-1/4"'], '6-1/2 in.': ["6 1/2", '6.5"']},
        "colour": {k: COLOURS[k] for k in ("Black", "Yellow", "Red")}}),
    Category("Bath Towel Set", ("towels", "bath towels", "towel set"), {
        "colour": COLOURS, "material": {"Cotton": ["cotton"], "Bamboo": ["bamboo"], "Microfiber": ["microfiber", "quick dry"]},
        "size": {"6-Piece": ["6 piece", "6pc"], "4-Piece": ["4 piece", "4pc"]}}),
    Category("Outdoor Grill", ("grill", "bbq", "barbecue"), {
        "fuel": {"Propane Gas": ["propane", "gas grill", "lp"], "Charcoal": ["charcoal", "kettle"],
                 "Pellet": ["pellet", "smoker", "pellet smoker"]},
        "colour": {k: COLOURS[k] for k in ("Black", "Red", "Gray")},
        "size": {"2-Burner": ["2 burner", "small"], "4-Burner": ["4 burner"], "6-Burner": ["6 burner", "large"]}}),
    Category("Office Chair", ("office chair", "desk chair", "computer chair", "chair"), {
        "colour": COLOURS, "material": {k: MATERIALS[k] for k in ("Leather", "Polyester", "Aluminum")},
        "feature": {"Ergonomic": ["ergonomic", "lumbar support"], "with Armrests": ["armrests", "arms"],
                    "Mesh Back": ["mesh", "breathable"]}}),
]

BRAND_SYLLABLES = ["var", "lo", "tek", "pro", "max", "del", "ton", "rix", "ba", "zen", "cor", "vi",
                   "mon", "ar", "kel", "sta", "quin", "ro", "ve", "lux"]
SERIES = ["Elite", "Classic", "Pro", "Essentials", "Signature", "Urban", "Heritage", "Select"]


@dataclass
class Product:
    """One catalog entry and everything a query about it may mention."""

    item_id: str
    category: int
    brand: str
    nickname: str
    values: dict[str, str]
    code: str
    title: str


def _brands(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """Pronounceable brand names and the nickname shoppers type ("Rixton" -> "rx")."""
    seen: set[str] = set()
    out = []
    while len(out) < count:
        name = "".join(rng.sample(BRAND_SYLLABLES, rng.choice((2, 3)))).capitalize()
        if name in seen or len(name) > 10:
            continue
        seen.add(name)
        nickname = (name[0] + name[len(name) // 2] + name[-1]).lower()
        out.append((name, nickname))
    return out


def _title(rng: random.Random, cat: Category, brand: str, values: dict[str, str], code: str) -> str:
    series = rng.choice(SERIES)
    vals = list(values.values())
    rng.shuffle(vals)
    templates = [
        "{brand} {series} {vals} {noun}",
        "{brand} {vals} {noun} - Model {code}",
        "{brand} {noun}, {commavals}",
        "{vals} {noun} by {brand} ({code})",
        "{brand} {series} {noun} in {last} with {first}",
    ]
    template = rng.choice(templates)
    return template.format(brand=brand, series=series, vals=" ".join(vals), noun=cat.noun, code=code,
                           commavals=", ".join(vals), last=vals[-1], first=vals[0])


def build_catalog(rng: random.Random, num_items: int) -> list[Product]:
    """Products spread over the categories, each with one value per attribute axis."""
    brands = [_brands(rng, 6) for _ in CATEGORIES]
    products = []
    for index in range(num_items):
        c = index % len(CATEGORIES)
        cat = CATEGORIES[c]
        brand, nickname = rng.choice(brands[c])
        values = {axis: rng.choice(sorted(pool)) for axis, pool in cat.attributes.items()}
        code = f"{brand[:2].upper()}-{rng.randrange(1000, 9999)}"
        products.append(Product(f"P{index:06d}", c, brand, nickname, values, code,
                                _title(rng, cat, brand, values, code)))
    return products


def _typo(rng: random.Random, word: str) -> str:
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:  # swap two neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:  # drop one
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]  # double one


@dataclass
class Intent:
    """What a query asks for: the judged product and the facets it names."""

    product: Product
    axes: tuple[str, ...]
    brand: bool
    code: bool


def make_query(rng: random.Random, product: Product) -> tuple[str, Intent]:
    """A shopper's query for ``product``: some facets, synonyms, noise."""
    cat = CATEGORIES[product.category]
    axes = tuple(a for a in cat.attributes if rng.random() < 0.55)
    brand, code = rng.random() < 0.3, rng.random() < 0.06
    parts = [rng.choice(cat.synonyms)]
    for axis in axes:
        value = product.values[axis]
        parts.insert(rng.randrange(len(parts) + 1),
                     rng.choice(cat.attributes[axis][value] + [value.lower()] * 1))
    if brand:
        parts.insert(0, product.nickname if rng.random() < 0.4 else product.brand.lower())
    if code:
        parts.append(product.code.replace("-", "").lower() if rng.random() < 0.6 else product.code.lower())
    words = " ".join(parts).split()
    if rng.random() < 0.25:
        rng.shuffle(words)
    words = [_typo(rng, w) if rng.random() < 0.08 else w for w in words]
    return " ".join(words), Intent(product, axes, brand, code)


def judge(intent: Intent, products_by_category: list[list[Product]], rng: random.Random,
          num_partial: int = 10) -> dict[str, int]:
    """Graded relevance of the catalog for one query intent.

    3: the intended product; 2: any product of the category that matches every facet the
    query names (so it satisfies the shopper as well); 1: a sample of same-category products
    missing a facet. Unlisted products are irrelevant (0).
    """
    target = intent.product
    grades = {target.item_id: 3}
    partial = []
    for other in products_by_category[target.category]:
        if other is target:
            continue
        matches = all(other.values[a] == target.values[a] for a in intent.axes)
        matches = matches and (not intent.brand or other.brand == target.brand) and not intent.code
        if matches:
            grades[other.item_id] = 2
        else:
            partial.append(other.item_id)
    for item_id in rng.sample(partial, min(num_partial, len(partial))):
        grades[item_id] = 1
    return grades


# Facets a product photo shows: with image features, some titles leave these out.
VISUAL_AXES = ("colour", "material")
# Share of products whose title drops its visual facets (only the "image" shows them), and
# of products without an image at all (their vector is null), with ``image_features``.
HIDDEN_FACET_SHARE = 0.5
NO_IMAGE_SHARE = 0.05


def add_image_features(products: list[Product], dim: int, seed: int) -> dict[str, list[float] | None]:
    """Give products an "image" vector and drop the visual facets from some titles.

    Each visual facet value ("Red", "Leather" ...) has a fixed random direction; a product's
    vector is the sum of its values' directions plus noise, so it shows its colour and
    material whatever its title says. ``HIDDEN_FACET_SHARE`` of the products get a new title
    without those values (text alone cannot tell a red sofa from a grey one then), and
    ``NO_IMAGE_SHARE`` have no vector. Uses its own random stream: the rest of the data
    (queries, clicks, judgements) is the same as without image features.

    Args:
        products: the catalog (titles are changed in place).
        dim: vector length.
        seed: the generator's seed.

    Returns:
        item id -> vector (4 decimals) or None.
    """
    rng = random.Random(f"{seed}:image")
    directions: dict[tuple[str, str], list[float]] = {}
    out: dict[str, list[float] | None] = {}
    for product in products:
        cat = CATEGORIES[product.category]
        visual = [(a, v) for a, v in product.values.items() if a in VISUAL_AXES]
        vector = [rng.gauss(0.0, 0.3) for _ in range(dim)]
        for key in visual:
            if key not in directions:
                directions[key] = [rng.gauss(0.0, 1.0) for _ in range(dim)]
            vector = [x + d / max(1, len(visual)) ** 0.5 for x, d in zip(vector, directions[key])]
        if visual and rng.random() < HIDDEN_FACET_SHARE:
            shown = {a: v for a, v in product.values.items() if a not in VISUAL_AXES}
            product.title = _title(rng, cat, product.brand, shown, product.code)
        out[product.item_id] = None if rng.random() < NO_IMAGE_SHARE else [round(x, 4) for x in vector]
    return out


# Engagement behind a click, as the ``grade`` of ``training_signals``: 1 click, 2 add to
# cart, 3 purchase, with these probabilities.
GRADES = ((1, 0.7), (2, 0.2), (3, 0.1))
MAX_JUDGED = 20


def training_signals(rng: random.Random, intent: Intent, by_category: list[list[Product]],
                     hard_negatives: int) -> dict[str, Any]:
    """What richer click logs carry besides the pair, for one training click.

    ``negs``: up to ``hard_negatives`` products of the clicked one's category that miss a
    facet the query names (shown, not clicked: true hard negatives); ``grade``: the click's
    engagement (``GRADES``); ``judged``: ids of the other products that match everything the
    query names (relevant but not clicked: never negatives; at most ``MAX_JUDGED``); ``teacher``: a teacher model's
    scores, the positive first, then each of ``negs`` (higher the more facets it shares).

    Args:
        rng: the signals' own random stream.
        intent: the click's query intent (``make_query``).
        by_category: the catalog by category.
        hard_negatives: negatives per click.
    """
    grades = judge(intent, by_category, rng, num_partial=0)
    target = intent.product
    judged = sorted(i for i, g in grades.items() if g == 2)
    if len(judged) > MAX_JUDGED:  # a broad query ("grill"): a sample is enough to show the idea
        judged = sorted(rng.sample(judged, MAX_JUDGED))
    others = [p for p in by_category[target.category] if p.item_id not in grades]
    negs = rng.sample(others, min(hard_negatives, len(others)))
    axes = intent.axes or tuple(target.values)

    def teacher(product: Product) -> float:
        shared = sum(product.values[a] == target.values[a] for a in axes) / len(axes)
        return round(0.3 + 0.4 * shared + rng.gauss(0.0, 0.03), 4)

    return {"negs": [{"item_id": p.item_id, "item_text": p.title} for p in negs],
            "grade": rng.choices([g for g, _ in GRADES], weights=[w for _, w in GRADES])[0],
            "judged": judged, "teacher": [round(0.9 + rng.gauss(0.0, 0.03), 4), *map(teacher, negs)]}


def generate(out_dir: str | Path, num_pairs: int, seed: int = 0, num_items: int | None = None,
             num_eval_queries: int | None = None, zipf_exponent: float = 1.05,
             max_relevant: int = 20, image_features: int | None = None,
             cold_items: int = 0, hard_negatives: int | None = None) -> dict[str, Any]:
    """Write ``train.jsonl``, ``catalog.jsonl`` and ``eval.jsonl`` into ``out_dir``.

    The same arguments always give byte-identical files. Eval queries never appear as train
    queries.

    Args:
        out_dir: output folder (created).
        num_pairs: click pairs in ``train.jsonl``.
        seed: random seed.
        num_items: catalog size (default: about one item per 10 pairs, 240..5000).
        num_eval_queries: held-out queries (default: 300, fewer for tiny runs).
        zipf_exponent: popularity skew of clicks over products.
        max_relevant: eval queries with more relevant products (too broad to judge a
            ranking) are not kept.
        image_features: write a ``features`` vector of this length per product into
            ``train.jsonl`` and ``catalog.jsonl`` (``add_image_features``: some titles then
            leave out colour and material, which only the vector shows).
        cold_items: products (drawn at random, popular ones included) never clicked in
            ``train.jsonl``; they stay in the catalog and in the eval judgements.
        hard_negatives: add ``training_signals`` with this many hard negatives to every row
            of ``train.jsonl`` (fields ``negs``, ``grade``, ``judged``, ``teacher``).

    Returns:
        Counts of what was written.
    """
    # DataErrors (ValueErrors): the CLI prints them as one line with exit status 2.
    if num_pairs < 1:
        raise DataError(f"--pairs must be >= 1, got {num_pairs}")
    if image_features is not None and image_features < 1:
        raise DataError(f"--image-features must be >= 1, got {image_features}")
    if num_items is not None and num_items < 1:
        raise DataError(f"--items must be >= 1, got {num_items}")
    if hard_negatives is not None and hard_negatives < 1:
        raise DataError(f"--hard-negatives must be >= 1, got {hard_negatives}")
    rng = random.Random(seed)
    catalog = "--items" if num_items else f"by default max(240, min(5000, --pairs / 10)) for --pairs {num_pairs}"
    num_items = num_items or max(240, min(5000, num_pairs // 10))
    if not 0 <= cold_items < num_items:
        raise DataError(f"--cold-items must be in [0, {num_items}): fewer than the catalog's {num_items} products "
                        f"({catalog}), got {cold_items}; lower --cold-items or raise --items")
    num_eval_queries = num_eval_queries if num_eval_queries is not None else min(300, max(20, num_pairs // 20))
    products = build_catalog(rng, num_items)
    vectors = add_image_features(products, image_features, seed) if image_features else None
    # Its own stream, so that cold_items=0 leaves every other draw as it was.
    cold = {p.item_id for p in random.Random(f"{seed}:cold").sample(products, cold_items)}
    by_category: list[list[Product]] = [[] for _ in CATEGORIES]
    for p in products:
        by_category[p.category].append(p)
    # Popularity rank is a random permutation: popular products in every category.
    ranked = products[:]
    rng.shuffle(ranked)
    weights = [1.0 / (r + 1) ** zipf_exponent for r in range(len(ranked))]

    train_queries: set[str] = set()
    train_rows = []
    clicked = [(p, w) for p, w in zip(ranked, weights) if p.item_id not in cold]
    signals_rng = random.Random(f"{seed}:signals")  # its own stream: the pairs stay as they are
    for product in rng.choices([p for p, _ in clicked], weights=[w for _, w in clicked], k=num_pairs):
        query, intent = make_query(rng, product)
        train_queries.add(query)
        row = {"query": query, "item_id": product.item_id, "item_text": product.title}
        if vectors is not None:
            row["features"] = vectors[product.item_id]
        if hard_negatives is not None:
            row.update(training_signals(signals_rng, intent, by_category, hard_negatives))
        train_rows.append(row)

    eval_rows = _eval_rows(random.Random(f"{seed}:eval"), ranked, weights, by_category, train_queries,
                           num_eval_queries, max_relevant)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", train_rows)
    catalog = [{"item_id": p.item_id, "item_text": p.title} for p in products]
    if vectors is not None:
        for row in catalog:
            row["features"] = vectors[row["item_id"]]
    _write_jsonl(out / "catalog.jsonl", catalog)
    _write_jsonl(out / "eval.jsonl", eval_rows)
    counts = {"pairs": len(train_rows), "items": len(products), "eval_queries": len(eval_rows),
              "distinct_train_queries": len(train_queries)}
    if cold:
        counts["cold_items"] = len(cold)
    if vectors is not None:
        counts["image_features"] = image_features
    if hard_negatives is not None:
        counts["hard_negatives"] = hard_negatives
    return counts


def _eval_rows(eval_rng: random.Random, ranked: list[Product], weights: list[float],
               by_category: list[list[Product]], train_queries: set[str], num_eval_queries: int,
               max_relevant: int) -> list[dict[str, Any]]:
    """Held-out judged queries for ``generate``: none is a training query string."""
    eval_rows: list[dict[str, Any]] = []
    seen_eval: set[str] = set()
    attempts = 0
    while len(eval_rows) < num_eval_queries and attempts < num_eval_queries * 50:
        attempts += 1
        product = eval_rng.choices(ranked, weights=weights, k=1)[0]
        query, intent = make_query(eval_rng, product)
        if query in train_queries or query in seen_eval:
            continue  # held out: a query string seen in training would leak its answer
        grades = judge(intent, by_category, eval_rng)
        if sum(g >= 2 for g in grades.values()) > max_relevant:
            continue  # "grill" alone: a whole category is relevant and no ranking is judged
        seen_eval.add(query)
        eval_rows.append({"query": query, "relevance": grades})
    return eval_rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    # Written beside and renamed: a crash never leaves a truncated file that looks complete.
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
