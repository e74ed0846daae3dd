"""Template synthesis for Slipstream: seeded, slot-based generation of validated TQT examples.

Run it:
    python -m tasks.synth.templates -n 2000 --seed 42 -o out.jsonl

The content (agents, slot pools, phrasings, thoughts and payload patterns for each of the 19 dataset
anchors) lives in data/slipstream-templates.yaml. A prompt is an optional speaker line plus one phrasing
of the anchor with the destination agent and every slot of the anchor filled in; the loader refuses a
phrasing that leaves a slot out, so the number of distinct prompts an anchor can make is exactly the
product of its slot sizes (its *capacity*). Prompts are drawn without replacement and deduplicated by
tasks.data.rows.normalise; asking for more than the capacity raises with the number instead of quietly
returning fewer (slipcore.finetune returns its 149 examples whatever -n says).

Each answer is built by tasks.protocol.format_tqt (so QUANTIZE hints are the UCR-derived ones), written
without the QUANTIZE line at the dataset's rate (499 of 2,283 rows, ~22%), and checked by parse_tqt.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import random
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import yaml
from prefect import task
from pydantic import Field, ValidationError

from tasks.data.rows import normalise
from tasks.protocol import DATASET_ANCHORS, UCR_ANCHORS, agent_id_as_written, normalise_agent
from tasks.recipe import DATA_DIR, StrictModel, key_lines
from tasks.run import atomic_write_jsonl
from tasks.synth.records import SYSTEM_PROMPT_BASIC, SynthRecord

GENERATOR_VERSION = 1
TEMPLATES_PATH = DATA_DIR / "slipstream-templates.yaml"
NO_QUANTIZE_RATE = 499 / 2283   # share of THOUGHT+SLIP-only answers in the published dataset
NO_SPEAKER_RATE = 0.4           # share of prompts that do not name their sender
ADDRESSED_RATE = 0.15           # share of prompts written as a message from src to dst ("ana to bo: ...")


class TemplateError(ValueError):
    """A template file that breaks a rule (file:line: field: rule), or a request beyond capacity."""


class AnchorTemplates(StrictModel):
    weight: int = Field(gt=0, description="relative share of this anchor in a generated set")
    src: list[str] = Field(min_length=1, description="agent ids or groups that may be named as sender")
    dst: list[str] = Field(min_length=1, description="agent ids or groups that may receive the message")
    slots: dict[str, str] = Field(description="slot name -> pool name")
    prompts: list[str] = Field(min_length=1)
    direct: list[str] = Field(default_factory=list, description="phrasings said to the recipient (second "
                              "person: 'could you review {artifact}?'), with the anchor's slots and no {dst}; each "
                              "follows every `addressed` header, which names both ends")
    thoughts: list[str] = Field(min_length=1)
    payload: str


class TemplateSpec(StrictModel):
    version: int
    default_src: str
    speakers: list[str] = Field(min_length=1)
    addressed: list[str] = Field(default_factory=list, description="headers naming sender and recipient "
                                 "({src} and {dst}: '{src} to {dst}:') before an anchor's `direct` phrasings")
    agents: dict[str, list[str]]
    people: list[str] = Field(default_factory=list, description="recipients named as themselves (people, "
                              "bots): each is an agent whose id is normalise_agent(name), group 'people'; the SLIP "
                              "line writes it as the prompt does (protocol.agent_id_as_written)")
    groups: dict[str, list[str]] = {}
    pools: dict[str, list[str | dict[str, str]]]
    anchors: dict[str, AnchorTemplates]


@dataclass(frozen=True)
class Fill:
    """One filled slot value: formats as its text, exposes its other forms (`{task.past}`) as attributes."""

    fields: tuple[tuple[str, str], ...]

    def __getattr__(self, name: str) -> str:
        for key, value in self.fields:
            if key == name:
                return value
        raise AttributeError(name)

    def __format__(self, spec: str) -> str:
        return format(self.text, spec)


@dataclass(frozen=True)
class Party:
    speaker: str          # "" when the prompt does not name its sender (or an addressed prompt names it)
    src: str
    dst_mention: str
    dst: str
    src_mention: str = ""   # how an addressed prompt names the sender


@dataclass(frozen=True)
class AnchorSpace:
    """Everything one anchor can vary: parties x phrasings x each slot's values. A party is either no speaker
    (the sender is `default_src`) or one of `senders`, with one of `recipients`, never the same agent twice; the
    named parties are drawn, not listed (speaker forms x senders x recipients runs to millions)."""

    anchor: str
    weight: int
    senders: tuple[tuple[str, str, str], ...]   # (speaker line, src id, mention): every speaker form of every sender
    recipients: tuple[tuple[str, str], ...]     # (mention, dst id)
    default_src: str
    prompts: tuple[str, ...]
    addressed: tuple[str, ...]   # header x direct phrasing, with {src} and {dst}: no speaker line before them
    thoughts: tuple[str, ...]
    payload: str
    slots: tuple[tuple[str, tuple[Fill, ...]], ...]

    @cached_property
    def unnamed(self) -> tuple[Party, ...]:
        return tuple(Party("", self.default_src, m, d) for m, d in self.recipients if d != self.default_src)

    @cached_property
    def sender_mentions(self) -> tuple[tuple[str, str], ...]:
        """(mention, src id) once each, whatever the speaker forms (addressed prompts name the sender themselves)."""
        return tuple(dict.fromkeys((m, s) for _, s, m in self.senders))

    @staticmethod
    def _pairs(senders, recipients) -> int:
        """Sender x recipient pairs whose agents differ."""
        per_src, per_dst = Counter(s for *_, s in senders), Counter(d for _, d in recipients)
        return len(senders) * len(recipients) - sum(n * per_dst[a] for a, n in per_src.items())

    @cached_property
    def named_count(self) -> int:
        return self._pairs([(sp, s) for sp, s, _ in self.senders], self.recipients)

    def named(self) -> Iterator[Party]:
        """Every party with a speaker, in file order."""
        for speaker, src, src_mention in self.senders:
            for mention, dst in self.recipients:
                if src != dst:
                    yield Party(speaker, src, mention, dst, src_mention)

    def addressed_parties(self) -> Iterator[Party]:
        """Every (sender mention, recipient) of an addressed prompt, in file order."""
        for src_mention, src in self.sender_mentions:
            for mention, dst in self.recipients:
                if src != dst:
                    yield Party("", src, mention, dst, src_mention)

    def draw_named(self, rng: random.Random) -> Party:
        while True:   # rejection: a sender who is also the recipient is rare (one id among hundreds)
            (speaker, src, src_mention), (mention, dst) = rng.choice(self.senders), rng.choice(self.recipients)
            if src != dst:
                return Party(speaker, src, mention, dst, src_mention)

    @property
    def capacity(self) -> int:
        per_prompt = math.prod(len(v) for _, v in self.slots)
        return per_prompt * ((self.named_count + len(self.unnamed)) * len(self.prompts)
                             + self._pairs(self.sender_mentions, self.recipients) * len(self.addressed))


def _fields(template: str) -> set[str]:
    return {name.split(".")[0] for _, name, _, _ in string.Formatter().parse(template) if name}


def _parse_entry(entry: str | dict) -> dict[str, str]:
    if isinstance(entry, str):
        text, _, slug = entry.partition("|")
        return {"text": text, "slug": slug}
    return dict(entry)


def _expand_pool(entries: list, flat: dict[str, list[dict]]) -> list[Fill]:
    """Expand `{pool}` references inside entries into every combination (slug fields get slugs)."""
    out = []
    for entry in map(_parse_entry, entries):
        refs = sorted(set().union(*(_fields(v) for v in entry.values())))
        for combo in itertools.product(*(flat[r] for r in refs)):
            picked = dict(zip(refs, combo))
            out.append(Fill(tuple(
                (k, v.format(**{r: picked[r]["slug" if k.endswith("slug") else "text"] for r in refs}))
                for k, v in entry.items())))
    return out


def _fail(path: Path, node, loc: tuple, rule: str):
    """Raise TemplateError at the line of the deepest key of `loc` that the YAML file has."""
    lines = key_lines(node)
    line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), 1)
    raise TemplateError(f"{path}:{line}: {'.'.join(map(str, loc))}: {rule}")


def load_spaces(path: Path = TEMPLATES_PATH) -> dict[str, AnchorSpace]:
    """Load and check the template file; one AnchorSpace per anchor.

    Raises:
        TemplateError: file:line: field: rule, for schema errors, unknown agents/pools/anchors, a phrasing
            that does not use exactly {dst} and the anchor's slots, or duplicate pool values.
    """
    text = Path(path).read_text()
    node = yaml.compose(text)
    try:
        spec = TemplateSpec.model_validate(yaml.safe_load(text))
    except ValidationError as exc:
        err = exc.errors()[0]
        _fail(path, node, tuple(err["loc"]), err["msg"])
    for i, person in enumerate(spec.people):
        ident = normalise_agent(person)
        if ident in spec.agents or not ident:
            _fail(path, node, ("people", i), f"id {ident!r} is empty or already an agent")
        spec.agents[ident] = [person]
    if spec.people:
        spec.groups.setdefault("people", [normalise_agent(p) for p in spec.people])
    for i, header in enumerate(spec.addressed):
        if _fields(header) != {"src", "dst"}:
            _fail(path, node, ("addressed", i), "must use exactly {src} and {dst}")
    missing = set(DATASET_ANCHORS) - set(spec.anchors)
    if missing:
        _fail(path, node, ("anchors",), f"missing dataset anchors {sorted(missing)}")
    mentions = [m for ms in spec.agents.values() for m in ms]
    if len({normalise(m) for m in mentions}) != len(mentions):
        _fail(path, node, ("agents",), "two agents share a mention")
    flat = {}
    for name, entries in spec.pools.items():
        parsed = [_parse_entry(e) for e in entries]
        if not any(_fields(v) for e in parsed for v in e.values()):
            flat[name] = parsed
    for name, entries in spec.pools.items():
        refs = {r for e in entries for v in _parse_entry(e).values() for r in _fields(v)}
        if refs - set(flat):
            _fail(path, node, ("pools", name), f"references {sorted(refs - set(flat))}, which are not flat pools")
    pools = {name: _expand_pool(entries, flat) for name, entries in spec.pools.items()}
    for name, fills in pools.items():
        if len({normalise(f.text) for f in fills}) != len(fills):
            _fail(path, node, ("pools", name), "two values are the same after normalising")

    def agents(loc, names):
        ids = [i for n in names for i in spec.groups.get(n, [n])]
        for i in ids:
            if i not in spec.agents:
                _fail(path, node, loc, f"unknown agent or group {i!r}")
        return list(dict.fromkeys(ids))

    people = {normalise_agent(p) for p in spec.people}

    def wire_id(mention: str, ident: str) -> str:
        # A person's id in the SLIP line is the name as the prompt writes it (protocol.agent_id_as_written);
        # ids compare after normalise_agent, so "Tobias" is the agent tobias. Teams keep their fixed ids.
        return agent_id_as_written(mention) if ident in people else ident

    spaces = {}
    for anchor, a in spec.anchors.items():
        loc = ("anchors", anchor)
        if anchor not in UCR_ANCHORS:
            _fail(path, node, loc, "not a UCR anchor")
        for slot, pool in a.slots.items():
            if pool not in pools:
                _fail(path, node, loc + ("slots", slot), f"unknown pool {pool!r}")
        for i, prompt in enumerate(a.prompts):
            if _fields(prompt) != {"dst", *a.slots}:
                _fail(path, node, loc + ("prompts", i), f"must use exactly {{dst}} and the slots {sorted(a.slots)}")
        for i, phrasing in enumerate(a.direct):
            if _fields(phrasing) != set(a.slots):
                _fail(path, node, loc + ("direct", i), f"must use exactly the slots {sorted(a.slots)} (no {{dst}})")
        for key, templates in (("thoughts", a.thoughts), ("payload", [a.payload])):
            for i, t in enumerate(templates):
                if not _fields(t) <= {"dst", *a.slots}:
                    _fail(path, node, loc + (key, i), f"uses a name that is not dst or a slot: {sorted(_fields(t))}")
        dsts = [(m, wire_id(m, d)) for d in agents(loc + ("dst",), a.dst) for m in spec.agents[d]]
        srcs = [(s.format(src=m), wire_id(m, i), m) for i in agents(loc + ("src",), a.src) for m in spec.agents[i]
                for s in spec.speakers]
        spaces[anchor] = AnchorSpace(
            anchor=anchor, weight=a.weight, prompts=tuple(a.prompts), thoughts=tuple(a.thoughts),
            payload=a.payload, slots=tuple((s, tuple(pools[p])) for s, p in a.slots.items()),
            senders=tuple(srcs), recipients=tuple(dsts), default_src=spec.default_src,
            addressed=tuple(f"{h} {d}" for h in spec.addressed for d in a.direct))
    return spaces


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def render(space: AnchorSpace, party: Party, prompt: str, fills: dict[str, Fill], rng: random.Random) -> SynthRecord:
    """One record from fixed prompt-side choices; the thought and the QUANTIZE line are drawn from rng."""
    values = {"dst": party.dst_mention, **fills}
    if "{src" in prompt:   # addressed: the header names the sender, no speaker line before it
        text, speaker = prompt.format(src=party.src_mention, **values), ""
    else:
        text, speaker = prompt.format(**values), party.speaker
    # A phrasing that opens with a name keeps it as written ("dave, please ..."): people do not capitalise a
    # name they type in lower case, and the id the answer carries is the lower-cased name anyway.
    instruction = " ".join(p for p in (speaker, text if prompt.startswith(("{dst}", "{src}")) else _sentence(text)) if p)
    return SynthRecord(
        instruction=instruction, thought=_sentence(rng.choice(space.thoughts).format(**values)),
        src=party.src, dst=party.dst, anchor=space.anchor,
        payload=tuple(space.payload.format(**values).split()), with_quantize=rng.random() >= NO_QUANTIZE_RATE)


def _draw(space: AnchorSpace, rng: random.Random):
    fills = {name: rng.choice(values) for name, values in space.slots}
    if space.addressed and rng.random() < ADDRESSED_RATE:
        named = space.draw_named(rng)
        return Party("", named.src, named.dst_mention, named.dst, named.src_mention), rng.choice(space.addressed), fills
    party = rng.choice(space.unnamed) if rng.random() < NO_SPEAKER_RATE else space.draw_named(rng)
    return party, rng.choice(space.prompts), fills


def _enumerate(space: AnchorSpace, rng: random.Random):
    """Every combination once, in random order (used when an anchor is asked for most of its capacity)."""
    slot_values = [values for _, values in space.slots]
    combos = (list(itertools.product([*space.unnamed, *space.named()], space.prompts, *slot_values))
              + list(itertools.product(space.addressed_parties(), space.addressed, *slot_values)))
    rng.shuffle(combos)
    for party, prompt, *values in combos:
        yield party, prompt, dict(zip((n for n, _ in space.slots), values))


def allocate(n: int, spaces: dict[str, AnchorSpace]) -> dict[str, int]:
    """Split n over anchors by weight (largest remainder), at least one each when n allows, within capacity."""
    names = sorted(spaces, key=lambda a: -spaces[a].weight)
    total = sum(spaces[a].weight for a in names)
    quota = {a: n * spaces[a].weight / total for a in names}
    counts = {a: min(int(quota[a]), spaces[a].capacity) for a in names}
    if n >= len(names):
        counts = {a: max(1, c) for a, c in counts.items()}
    while sum(counts.values()) > n:
        counts[max(counts, key=counts.get)] -= 1
    for a in sorted(names, key=lambda a: counts[a] - quota[a]):
        if sum(counts.values()) == n:
            break
        counts[a] += counts[a] < spaces[a].capacity
    while sum(counts.values()) < n:   # quotas left capacity unused on some anchors: fill the roomiest
        roomy = max(names, key=lambda a: spaces[a].capacity - counts[a])
        counts[roomy] += 1
    return counts


def synthesize(n: int, seed: int, path: Path = TEMPLATES_PATH) -> list[SynthRecord]:
    """n records with distinct normalised prompts, deterministic for (n, seed, template file).

    Raises:
        TemplateError: n is larger than the template space can make (the message gives the capacity),
            or deduplication exhausted an anchor before it reached its share.
    """
    spaces = load_spaces(path)
    capacity = sum(s.capacity for s in spaces.values())
    if n > capacity:
        raise TemplateError(f"asked for {n} examples but the templates in {path} can make at most {capacity} "
                            f"distinct prompts ({', '.join(f'{a} {s.capacity}' for a, s in spaces.items())})")
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[SynthRecord] = []
    for anchor, want in allocate(n, spaces).items():
        space, made, misses = spaces[anchor], 0, 0
        draws = _enumerate(space, rng) if want * 2 > space.capacity else iter(lambda: _draw(space, rng), None)
        for party, prompt, fills in draws:
            if made == want or misses > 50 * want + 1000:
                break
            record = render(space, party, prompt, fills, rng)
            key = normalise(record.instruction)
            if key in seen:
                misses += 1
                continue
            seen.add(key)
            records.append(record)
            made += 1
        if made < want:
            raise TemplateError(f"{anchor}: made only {made} distinct prompts of the {want} asked for "
                                f"(capacity {space.capacity}; the rest collided after normalising)")
    rng.shuffle(records)
    return records


def generator_fingerprint(path: Path = TEMPLATES_PATH) -> str:
    """Version + this code + the template file: what decides the output besides (n, seed)."""
    h = hashlib.sha256(f"v{GENERATOR_VERSION}".encode())
    h.update(Path(__file__).read_bytes())
    h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def synth_cache_key(context, parameters) -> str:
    return f"synth-templates-{parameters['n']}-{parameters['seed']}-{generator_fingerprint()}"


@task(name="synthesize-from-templates", cache_key_fn=synth_cache_key, persist_result=True,
      result_serializer="json")
def synthesize_from_templates(n: int, seed: int) -> list[dict]:
    """n ShareGPT rows (data/slipstream-tqt.jsonl shape) from the Slipstream templates, cached by
    (n, seed, generator version, template file)."""
    return [r.to_sharegpt(SYSTEM_PROMPT_BASIC) for r in synthesize(n, seed)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate Slipstream TQT examples from slot templates.")
    parser.add_argument("-n", type=int, required=True, help="number of examples (distinct prompts)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (same seed, same file)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="ShareGPT JSONL to write")
    parser.add_argument("--templates", type=Path, default=TEMPLATES_PATH, help="template YAML")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        records = synthesize(args.n, args.seed, args.templates)
    except TemplateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_jsonl(args.output, [r.to_sharegpt() for r in records])
    counts = Counter(r.anchor for r in records)
    for anchor in sorted(counts, key=lambda a: -counts[a]):
        print(f"{anchor:<20} {counts[anchor]:>6}")
    no_q = sum(not r.with_quantize for r in records)
    print(f"{'total':<20} {len(records):>6}  ({no_q} without QUANTIZE, {len(counts)} anchors)")
    print(f"wrote {args.output} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
