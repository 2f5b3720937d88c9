"""Question/answer pairs for a scene, and the parsers that score generated answers per attribute.

Answers are built from varied templates; scoring never compares strings, it extracts the attribute
value (direction, count, shape, colour, speed) from both the reference and the generated answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from featspec.xmodal.world.scenes import COLOURS, SHAPES, Scene, SceneObject

ATTRIBUTES = ("direction", "count", "shape", "colour", "speed")
GRID = 10  # grounding answers ("where is X in frame k?") quote cells on a GRID x GRID grid
KINDS = ATTRIBUTES + ("describe",)
NUMBERS = {1: "one", 2: "two", 3: "three"}
DIR_PHRASES = {"left": ("to the left", "leftward", "left"), "right": ("to the right", "rightward", "right"),
               "up": ("upward", "up", "towards the top"), "down": ("downward", "down", "towards the bottom")}
SPEED_WORDS = {"fast": ("quickly", "fast"), "slow": ("slowly", "at a slow pace")}
OBJECT_NOUNS = ("object", "shape", "thing")


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str
    # (video frame, object index) of each cell the answer quotes, in order: where a grounded reader must look
    cells: tuple[tuple[int, int], ...] = ()


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _ref(scene: Scene, o: SceneObject) -> str:
    """Shortest unambiguous name: the shape alone when it is unique in the scene, else colour + shape."""
    same = [p for p in scene.objects if p.shape == o.shape]
    return f"the {o.shape}" if len(same) == 1 else f"the {o.colour} {o.shape}"


def _motion_text(o: SceneObject, rng: np.random.Generator) -> str:
    if o.motion == "spin":
        return "stays in place" if o.spin == 0 else "spins in place without moving"
    return f"moves {_pick(rng, DIR_PHRASES[o.motion])} {_pick(rng, SPEED_WORDS[o.speed])}"


def _describe(scene: Scene, rng: np.random.Generator) -> str:
    n = len(scene.objects)
    head = "The video shows one object" if n == 1 else f"The video shows {NUMBERS[n]} objects"
    parts = [f"{head} on a textured background."]
    for o in scene.objects:
        parts.append(f"A {o.size} {o.colour} {o.shape} {_motion_text(o, rng)}.")
    return " ".join(parts)


def grid_cell(fraction: float) -> int:
    """A position in [0, 1] as a cell of the GRID x GRID grid that direction answers quote."""
    return min(GRID - 1, int(fraction * GRID))


def cell_at(o: SceneObject, frame: int, frames: int = 8) -> tuple[int, int]:
    """The object's grid cell in video frame `frame` (1-based): paths are straight and steady, and the first
    and last video frames are the clip's first and last renders."""
    f = (frame - 1) / (frames - 1)
    x0, y0, x1, y1 = o.path
    return grid_cell(x0 + f * (x1 - x0)), grid_cell(y0 + f * (y1 - y0))


def _at(o: SceneObject, frame: int) -> str:
    """Where an object is in a frame, on the grid: "x 2, y 7"."""
    x, y = cell_at(o, frame)
    return f"x {x}, y {y}"


def _in_frame(o: SceneObject, frame: int, ref: str) -> str:
    """"In Frame 3 the cross is at x 2, y 7": the frame named as the prompt labels it, right before the
    lookup, so the answer carries the key (the label) the lookup needs; grounding answers use the same words."""
    return f"In Frame {frame} {ref} is at {_at(o, frame)}"


def _direction(scene: Scene, o: SceneObject, rng: np.random.Generator) -> QA:
    """The answer names the direction at once: the target's video tokens carry each object's motion (its tower
    attends across frames, `temporal.py`), so this is one lookup, like a colour. Answers that first quoted the
    object's cells in Frame 1 and Frame 8 did not teach a per-frame target to read positions
    (docs/crossmodal.md)."""
    ref = _ref(scene, o)
    q = _pick(rng, ("Which way is {r} moving?", "In which direction does {r} move?", "Where is {r} going?",
                    "Describe the motion of {r}.")).format(r=ref)
    if o.motion == "spin":
        a = f"{ref.capitalize()} does not move; it {'stays' if o.spin == 0 else 'spins'} in place during the clip."
    else:
        a = (f"{ref.capitalize()} is moving {_pick(rng, DIR_PHRASES[o.motion])}"
             f"{_pick(rng, (' across the frame', ' through the scene', ' during the clip'))}.")
    return QA("direction", q, a)


def grounding(scene: Scene, rng: np.random.Generator, n: int) -> list[QA]:
    """`n` short training turns "where is X in frame k?": each answer is one lookup in one labelled frame, the
    step direction and speed answers chain twice, with the loss on the cell digits instead of on the prose."""
    out = []
    for _ in range(n):
        o = _pick(rng, list(scene.objects))
        k = int(rng.integers(1, 9))
        q = _pick(rng, ("Where is {r} in frame {k}?", "In frame {k}, where is {r}?", "Give the position of {r} in frame {k}.")
                  ).format(r=_ref(scene, o), k=k)
        out.append(QA("where", q, _in_frame(o, k, _ref(scene, o)) + ".", ((k, scene.objects.index(o)),)))
    return out


def questions(scene: Scene, seed: int = 0, every_object: bool = False) -> list[QA]:
    """Every applicable question kind for the scene, one sampled phrasing each; `every_object` (training)
    asks direction, shape and speed about every object they apply to instead of one each: these all hinge
    on reading motion across frames, the hardest skill, and extra turns after a shared visual prefix are cheap."""
    rng = np.random.default_rng([seed, scene.index, KINDS.index("describe") + 11])
    objs = scene.objects
    n = len(objs)
    out: list[QA] = []
    # direction: about an object that translates (or, failing that, one that spins)
    for o in (objs if every_object else [_pick(rng, [p for p in objs if p.motion != "spin"] or list(objs))]):
        out.append(_direction(scene, o, rng))
    # count
    q = _pick(rng, ("How many objects are in the video?", "How many shapes can you see?",
                    "Count the objects in the scene.", "How many things are there?"))
    noun = _pick(rng, OBJECT_NOUNS)
    listing = " and ".join(f"{'an' if p.colour[0] in 'aeiou' else 'a'} {p.colour} {p.shape}" for p in objs)
    a = (f"There is one {noun} in the video: {listing}." if n == 1
         else f"There are {NUMBERS[n]} {noun}s in the video: {listing}.")
    out.append(QA("count", q, a))
    # shape: of an object named by its colour when that is unique, else by its motion when that is
    # (naming by motion alone would make every shape answer hinge on reading motion first)
    def shape_name(p: SceneObject) -> str | None:
        if sum(q2.colour == p.colour for q2 in objs) == 1:
            return f"the {p.colour} {_pick(rng, ('object', 'thing'))}"
        if sum(q2.motion == p.motion for q2 in objs) == 1:
            return f"the {_pick(rng, ('object', 'thing'))} " + ("staying in place" if p.motion == "spin" else f"moving {DIR_PHRASES[p.motion][0]}")
        return None

    nameable = [p for p in objs if shape_name(p) is not None]
    for o in (nameable if every_object else [_pick(rng, nameable)] if nameable else []):
        name = shape_name(o)
        q = _pick(rng, ("What shape is {n}?", "What is {n}?", "Which shape is {n}?")).format(n=name)
        a = f"{name.capitalize()} is a {o.size} {o.shape}."
        out.append(QA("shape", q, a))
    # colour: of an object named by its shape (and motion when the shape repeats)
    o = _pick(rng, list(objs))
    same = [p for p in objs if p.shape == o.shape]
    name = f"the {o.shape}" if len(same) == 1 else (
        f"the {o.shape} {'staying in place' if o.motion == 'spin' else 'moving ' + DIR_PHRASES[o.motion][0]}")
    if len(same) == 1 or sum(p.motion == o.motion for p in same) == 1:
        q = _pick(rng, ("What colour is {r}?", "What color is {r}?", "Which colour does {r} have?")).format(r=name)
        tail = "and it stays in place" if o.motion == "spin" else f"and it moves {DIR_PHRASES[o.motion][0]}"
        out.append(QA("colour", q, f"{name.capitalize()} is {o.colour}, {tail}."))
    # speed: of a translating object
    movers = [p for p in objs if p.motion != "spin"]
    for o in (movers if every_object else [_pick(rng, movers)] if movers else []):
        q = _pick(rng, ("Is {r} moving fast or slowly?", "How fast does {r} move?", "Does {r} move quickly or slowly?")
                  ).format(r=_ref(scene, o))
        extent = "a long way" if o.speed == "fast" else "only a short distance"
        a = f"{_ref(scene, o).capitalize()} moves {_pick(rng, SPEED_WORDS[o.speed])}, {extent} during the clip."
        out.append(QA("speed", q, a))
    q = _pick(rng, ("Describe the scene.", "What happens in this video?", "Describe what you see in the video."))
    out.append(QA("describe", q, _describe(scene, rng)))
    return out


def question_for(scene: Scene, kind_index: int, seed: int = 0) -> QA:
    """The evaluation question of a clip: kinds cycle with the clip index so every attribute is covered."""
    qas = questions(scene, seed)
    by_kind = {qa.kind: qa for qa in qas}
    for k in range(len(KINDS)):
        kind = KINDS[(kind_index + k) % len(KINDS)]
        if kind in by_kind:
            return by_kind[kind]
    return qas[0]


_DIR_RE = re.compile(r"\b(left|leftward|right|rightward|up|upward|down|downward|top|bottom|in place)\b")
_DIR_CANON = {"leftward": "left", "rightward": "right", "upward": "up", "top": "up", "downward": "down",
              "bottom": "down", "in place": "none"}
_COUNT_RE = re.compile(r"\b(one|two|three|four|five|1|2|3|4|5)\b")
_COUNT_CANON = {"1": "one", "2": "two", "3": "three", "4": "four", "5": "five"}


def quoted_cells(answer: str) -> list[tuple[int, int]]:
    """The grid cells an answer quotes ("x 2, y 7"), in order."""
    return [(int(x), int(y)) for x, y in re.findall(r"\bx (\d), y (\d)\b", answer.lower())]


def parse(answer: str, attribute: str) -> str | None:
    """The first value of `attribute` an answer states, or None. Questions never name the value they ask for."""
    text = answer.lower()
    if attribute == "direction":
        found = [_DIR_CANON.get(m, m) for m in _DIR_RE.findall(text)]
    elif attribute == "count":
        found = [_COUNT_CANON.get(m, m) for m in _COUNT_RE.findall(text)]
    elif attribute == "shape":
        found = re.findall(r"\b(" + "|".join(SHAPES) + r")\b", text)
    elif attribute == "colour":
        found = re.findall(r"\b(" + "|".join(COLOURS) + r")\b", text)
    elif attribute == "speed":
        found = ["fast" if w in ("quickly", "fast", "quick") else "slow"
                 for w in re.findall(r"\b(quickly|fast|quick|slowly|slow)\b", text)]
    else:
        raise ValueError(f"unknown attribute '{attribute}': use one of {', '.join(ATTRIBUTES)}")
    return found[0] if found else None
