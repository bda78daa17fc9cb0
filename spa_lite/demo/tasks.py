"""Verifiable instruction-following demo task (pure Python, no torch).

Everyday questions are combined with one checkable constraint each
("Answer in at most 40 words.", "Do not use any commas.", ...).  Every
constraint kind has an instruction template and a verifier, so preference
pairs can be labelled by a program rather than by a judge model.

The verifier is only used to build the *seed* pairs and the held-out *eval*
pairs; SPA iterations label their own responses with the model itself.

Record format (JSON-serialisable)::

    {"id": "q0123-c05",
     "prompt": [{"role": "user", "content": "<question> <instruction>"}],
     "constraint": {"kind": "max_words", "params": {"n": 40}}}

The ``q`` part is the index of the question in :data:`QUESTIONS`, the ``c``
part the index of the kind in :data:`CONSTRAINT_KINDS`.
"""

from __future__ import annotations

import json
import random
import re
from typing import Dict, List, Mapping, Optional, Sequence

__all__ = [
    "QUESTIONS",
    "CONSTRAINT_KINDS",
    "KIND_WEIGHTS",
    "LOW_SEPARATION_KINDS",
    "instruction",
    "describe",
    "verify",
    "sample_constraint",
    "make_record",
    "make_prompt_records",
    "question_index",
    "count_words",
    "count_sentences",
    "count_paragraphs",
    "count_bullets",
]

# --------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------

_QUESTIONS_TEXT = """
How do I make fluffy scrambled eggs?
What is the best way to store fresh herbs?
How long should I boil pasta?
Why does bread dough need to rise?
How can I tell if an avocado is ripe?
What can I cook with leftover rice?
How do I keep cut apples from turning brown?
What is the difference between baking soda and baking powder?
How do I make a simple tomato sauce?
How can I make my coffee taste less bitter?
What is a quick and healthy breakfast idea?
How do I sharpen a kitchen knife?
How should I season a cast iron pan?
What are some easy vegetarian dinner ideas?
How do I cook rice without it getting sticky?
How can I make soup more flavorful?
What is the best way to reheat pizza?
How do I roast vegetables in the oven?
How do I know when chicken is fully cooked?
What spices go well with lentils?
How do I make a basic salad dressing?
Why do onions make you cry?
How can I bake cookies that stay soft?
What is a good way to use overripe bananas?
How do I brew a good cup of tea?
How do I poach an egg?
How can I reduce food waste at home?
What should I keep in a basic pantry?
How do I make homemade pancakes?
What is the easiest way to peel garlic?
How do I freeze bread so it stays fresh?
How can I make a quick lunch for work?
How do I cook dried beans?
What makes a good sandwich?
How do I make popcorn on the stove?
What is a healthy snack for the afternoon?
How do I stop pasta water from boiling over?
How do I pack light for a weekend trip?
What should I bring on a long flight?
How can I beat jet lag?
How do I find cheap flights?
What should I do if I lose my passport abroad?
How do I plan a road trip?
What are some tips for traveling alone?
How can I avoid getting sick while traveling?
How do I choose a good hotel?
What should I pack for a beach vacation?
How do I learn basic phrases before visiting a new country?
How can I save money while traveling?
What is the best way to carry money abroad?
How early should I arrive at the airport?
How do I stay safe in a crowded city?
What should I know before renting a car?
How can I make a long train ride more comfortable?
How do I prepare for a camping trip?
What should I put in a travel first aid kit?
How do I keep my luggage organized?
How can I travel with a small budget?
What should I do on a rainy day in a new city?
How do I get better sleep at night?
How much water should I drink each day?
How can I start exercising regularly?
What are simple ways to reduce stress?
How do I build a morning routine?
Why is stretching important?
How can I improve my posture at a desk?
What are the benefits of walking every day?
How do I stop snacking late at night?
How can I take care of my eyes when using screens?
Why is breakfast considered important?
How can I remember to take breaks while working?
What is a good warm-up before running?
How do I start meditating?
How can I eat more vegetables?
Why do we need vitamin D?
How do I keep my hands clean during flu season?
How can I make walking more fun?
What are good habits for healthy teeth?
How much sleep do teenagers need?
How can I cut down on sugar?
How do I stay motivated to work out?
What should I do after a long day of sitting?
How do I prevent sore muscles after exercise?
Why is the sky blue?
How do rainbows form?
What causes thunder?
Why do leaves change color in autumn?
How does a magnet work?
What is photosynthesis?
Why does ice float on water?
How do vaccines work?
What causes the seasons?
Why do we have tides?
How does the heart pump blood?
What is gravity?
How do airplanes stay in the air?
Why is the ocean salty?
What is an atom?
How do plants drink water?
What causes earthquakes?
How does sound travel?
Why do stars twinkle?
What is a black hole?
How do bees make honey?
Why do cats purr?
What is the water cycle?
How does a battery store energy?
Why does metal feel colder than wood?
How do clouds form?
What is DNA?
How do volcanoes erupt?
Why does the moon change shape?
What is electricity?
How do fish breathe underwater?
Why do we sneeze?
How does a refrigerator keep food cold?
What makes a rocket fly?
How do birds know where to migrate?
Why is the sun hot?
How do I make a monthly budget?
What is the best way to start saving money?
How does compound interest work?
Should I pay off debt or save first?
How can I spend less on groceries?
What is an emergency fund?
How do I track my spending?
What is a credit score?
How can I save money on my electric bill?
What should I know before my first job?
How do I ask for a raise?
How can I avoid impulse buying?
What is the difference between a debit card and a credit card?
How can I teach kids about money?
How do I save for a big purchase?
What are some cheap hobbies?
How can I lower my phone bill?
Is it better to rent or buy a home?
How do I split bills with roommates?
What is inflation?
How do I plan for holiday spending?
What is a good way to save for retirement?
How do I study for a big exam?
How can I focus better while studying?
What is the best way to take notes?
How do I stop procrastinating?
How can I remember what I read?
How do I write a good summary?
What is active recall?
How can I learn a new language faster?
How do I manage my time during exams?
How can I study with a group effectively?
How do I prepare for a presentation?
What should I do the night before a test?
How can I make flashcards more useful?
How do I read a textbook efficiently?
How can I stay calm during an exam?
How do I choose a topic for a school project?
How do I learn math more easily?
What are good study breaks?
How can I improve my handwriting?
How do I set goals for the school year?
How do I learn to type faster?
How can I get better at spelling?
How do I train my dog to sit?
How often should I feed my cat?
How do I help a new puppy feel at home?
What should I feed a pet rabbit?
How do I clean a fish tank?
Why does my dog bark at night?
How can I keep my cat from scratching furniture?
How often should I walk my dog?
What do hamsters need in their cage?
How do I introduce two cats?
How can I tell if my pet is sick?
How do I trim my dog's nails?
What toys are good for a bored cat?
How do I keep my pet cool in summer?
How do I choose the right dog breed?
How can I stop my puppy from biting?
How do I care for a pet turtle?
What should I know before adopting a pet?
How do I brush my cat's fur?
How can I keep my dog calm during fireworks?
How do I start a vegetable garden?
When should I plant tomatoes?
How often should I water my houseplants?
How do I make compost at home?
What plants grow well in shade?
How do I get rid of aphids naturally?
How do I grow herbs on a windowsill?
Why are my plant leaves turning yellow?
How do I repot a plant?
What flowers attract bees?
How do I keep my lawn green?
How can I grow strawberries in pots?
When is the best time to prune roses?
How do I save seeds from my garden?
What is mulch and why is it useful?
How do I care for a cactus?
How can I garden on a small balcony?
How do I know if my soil is healthy?
How do I grow potatoes in a bag?
What vegetables are easy for beginners?
How do I keep birds away from my garden?
How can I speed up my slow computer?
How do I make a strong password?
How do I back up my phone?
What should I do if my laptop will not turn on?
How can I make my phone battery last longer?
How do I clear my browser cache?
What is cloud storage?
How do I spot a phishing email?
How can I free up space on my phone?
How do I connect a printer to my computer?
What is two-factor authentication?
How do I fix a slow Wi-Fi connection?
How do I take a screenshot on a laptop?
How can I protect my privacy online?
What is a VPN used for?
How do I update my computer safely?
How can I organize my computer files?
How do I clean my keyboard?
What should I check before buying a used phone?
How do I set up a new email account?
How can I reduce screen time?
How do I keep my kids safe online?
What is a computer virus?
How do I transfer photos from my phone to my computer?
Who built the pyramids of Egypt?
Why did the Roman Empire fall?
What was the Industrial Revolution?
Who invented the printing press?
Why was the Great Wall of China built?
What was the Renaissance?
How did ancient people tell time?
Who were the Vikings?
What was the Silk Road?
Why did the Titanic sink?
How did the first Olympic Games start?
What was life like in a medieval castle?
Who was Marie Curie?
When did people first fly in an airplane?
How were castles defended?
What did ancient Romans eat?
Why is the Magna Carta important?
How did people travel before cars?
Who was Leonardo da Vinci?
What was the moon landing?
How did the telephone change the world?
How do I start writing a short story?
How can I make my emails sound more polite?
How do I write a good thank-you note?
What makes a strong opening sentence?
How do I write a cover letter?
How can I improve my vocabulary?
How do I write a clear paragraph?
How do I avoid writer's block?
What is the difference between its and it's?
How do I write a birthday message for a friend?
How can I make my essay more persuasive?
How do I edit my own writing?
How do I write a good product review?
How can I write shorter sentences?
How do I keep a journal?
How do I write a poem about nature?
How do I write a formal complaint letter?
How can I make a speech more interesting?
How do I write a good title for a blog post?
How do I describe a character in a story?
How do I clean a stained coffee mug?
How can I keep my closet organized?
How do I get rid of a bad smell in the fridge?
What is the best way to clean windows?
How do I remove a grease stain from clothes?
How often should I wash my bed sheets?
How can I make cleaning the house faster?
How do I unclog a drain without chemicals?
How do I fold a fitted sheet?
How can I keep my home cool without air conditioning?
How do I get rid of dust in my room?
How do I remove rust from tools?
How can I make my small apartment feel bigger?
How do I choose paint colors for a room?
How can I keep my house warm in winter?
How do I fix a squeaky door?
How do I hang a picture straight?
How can I declutter my kitchen?
How do I make new friends as an adult?
How can I be a better listener?
How do I say no politely?
How do I handle a disagreement with a friend?
How can I make small talk easier?
How do I apologize sincerely?
How can I stay in touch with family far away?
How do I plan a fun birthday party?
What is a good gift for a coworker?
How do I give helpful feedback?
How can I be more confident when speaking?
How do I deal with a noisy neighbor?
How can I support a friend who is sad?
How do I prepare for a job interview?
How can I be more productive at work?
How do I write a to-do list that works?
How do I deal with a difficult coworker?
How can I run a short meeting?
How do I ask my boss for feedback?
What should I wear to an interview?
How can I balance work and rest?
How do I learn a new skill for my job?
How do I answer the question tell me about yourself?
How can I organize my email inbox?
How do I prepare for my first day at a new job?
How do I check the tire pressure on my car?
How often should I change my car oil?
How can I save fuel when driving?
What should I keep in my car for emergencies?
How do I drive safely in the rain?
How do I jump-start a car battery?
How can I keep my bike in good shape?
How do I fix a flat bicycle tire?
What should I check before a long drive?
How do I park in a tight spot?
How can I stay awake on a long drive?
How do I clean the inside of my car?
How do I keep my car from overheating?
How can I reduce my plastic use?
How do I recycle correctly at home?
Why are bees important to the environment?
How can I save water at home?
What is climate change?
How can I make my home more energy efficient?
Why should we plant trees?
What is renewable energy?
How can I shop more sustainably?
How do solar panels work?
What happens to trash after we throw it away?
How can I help wildlife in my backyard?
Why is clean air important?
How do I start learning the guitar?
How can I get better at drawing?
What is a good hobby to relax?
How do I start running as a beginner?
How can I learn to juggle?
How do I choose a good book to read?
How do I start a photography hobby?
How can I learn to knit?
What board games are fun for families?
How do I get into bird watching?
How can I learn to swim as an adult?
How do I start a podcast?
How can I improve at chess?
How do I learn to play piano at home?
How do I plan a picnic?
What are fun things to do on a weekend?
How can I learn to dance?
How do I care for leather shoes?
How do I iron a shirt?
How can I make my clothes last longer?
How do I choose running shoes?
How should I wash a wool sweater?
How do I sew a button back on?
How can I dress warmly for winter?
How do I pack a suitcase without wrinkling clothes?
How can I keep my kids busy on a rainy day?
How do I help my child with homework?
How much screen time is okay for kids?
How can I get my toddler to eat vegetables?
How do I teach a child to ride a bike?
What are good bedtime routines for kids?
How can I encourage my child to read more?
How do I plan a family game night?
How can I teach kids to be kind?
How do I baby-proof my home?
How do I deal with a bee sting?
What should I do for a small burn?
How do I treat a minor cut?
What should I do if someone is choking?
How can I prepare for a power outage?
What should be in a home emergency kit?
How do I stay safe during a thunderstorm?
How do I prevent slips on icy sidewalks?
How can I make my home safer from fire?
What should I do if I get lost while hiking?
How do I use a fire extinguisher?
How do I read a nutrition label?
What is a balanced meal?
Why is fiber good for you?
How can I drink more water during the day?
What foods are high in protein?
Is it okay to skip dinner?
How can I eat healthy on a budget?
What is the difference between fruits and vegetables?
Why do we need sleep?
How do dreams happen?
Why do we yawn?
How does memory work?
Why do we get goosebumps?
How do our eyes see color?
Why do we hiccup?
How do muscles grow stronger?
Why does our stomach growl?
How do we taste food?
How do I prepare for a marathon?
What is the best time of day to exercise?
How can I improve my balance?
How do I do a proper push-up?
Is yoga good for beginners?
How do I stay active when it is cold outside?
How can I make my workouts shorter but effective?
How do I choose a good gym?
How can I enjoy cooking more?
How do I host a dinner party?
What should I bring to a potluck?
How do I make iced tea at home?
How do I plan meals for the week?
What is a good dessert for a hot day?
How do I make a smoothie?
How can I make vegetables taste better for kids?
How do I choose a ripe watermelon?
How do I make homemade pizza dough?
What are easy meals for one person?
"""

QUESTIONS: List[str] = [q.strip() for q in _QUESTIONS_TEXT.strip().splitlines() if q.strip()]

# --------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------

_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:['\u2019\-][A-Za-z0-9]+)*")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])[\"')\]\u201d]*\s+|\n+")
_PARAGRAPH_SPLIT_RE = re.compile(r"\n[ \t]*\n")
_BULLET_RE = re.compile(r"^[ \t]*[-*\u2022][ \t]+\S")
_FENCE_RE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\n?(.*?)\n?[ \t]*```$", re.DOTALL)
_LEADING_JUNK_RE = re.compile(r"^[^A-Za-z0-9]+")


def _clean(response: Optional[str]) -> str:
    if response is None:
        return ""
    return str(response).strip()


def count_words(text: str) -> int:
    """Number of words (runs of letters/digits, with inner ' or -)."""
    return len(_WORD_RE.findall(text or ""))


def count_sentences(text: str) -> int:
    """Sentences: split after . ! ? followed by whitespace, and at newlines."""
    parts = _SENTENCE_SPLIT_RE.split(_clean(text))
    return sum(1 for p in parts if _WORD_RE.search(p))


def count_paragraphs(text: str) -> int:
    """Blocks of text separated by at least one blank line."""
    parts = _PARAGRAPH_SPLIT_RE.split(_clean(text))
    return sum(1 for p in parts if _WORD_RE.search(p))


def count_bullets(text: str) -> int:
    """Lines starting with "- " or "* " (or a bullet character)."""
    return sum(1 for line in _clean(text).splitlines() if _BULLET_RE.match(line))


def _word_pattern(word: str) -> re.Pattern:
    # whole word, case-insensitive, a plain plural (s / es) counts as the word
    return re.compile(
        r"(?<![A-Za-z0-9])" + re.escape(word) + r"(?:s|es)?(?![A-Za-z0-9])", re.IGNORECASE
    )


def _count_word(text: str, word: str) -> int:
    return len(_word_pattern(word).findall(text))


def _strip_code_fence(text: str) -> str:
    m = _FENCE_RE.match(text)
    return m.group(1).strip() if m else text


# --------------------------------------------------------------------------
# Verifiers: verify_X(response, params) -> bool.  An empty response never passes.
# --------------------------------------------------------------------------


def _v_max_words(text: str, p: Mapping) -> bool:
    return count_words(text) <= int(p["n"])


def _v_min_words(text: str, p: Mapping) -> bool:
    return count_words(text) >= int(p["n"])


def _v_include_word(text: str, p: Mapping) -> bool:
    return _count_word(text, p["word"]) >= 1


def _v_exclude_word(text: str, p: Mapping) -> bool:
    return _count_word(text, p["word"]) == 0


def _v_no_commas(text: str, p: Mapping) -> bool:
    return "," not in text and "\uff0c" not in text


def _v_lowercase(text: str, p: Mapping) -> bool:
    return any(c.isalpha() for c in text) and text == text.lower()


def _v_uppercase(text: str, p: Mapping) -> bool:
    return any(c.isalpha() for c in text) and text == text.upper()


def _v_bullets(text: str, p: Mapping) -> bool:
    return count_bullets(text) == int(p["n"])


def _v_json_object(text: str, p: Mapping) -> bool:
    body = _strip_code_fence(text)
    try:
        obj = json.loads(body)
    except (ValueError, TypeError):
        return False
    return isinstance(obj, dict) and p["key"] in obj


def _v_end_with(text: str, p: Mapping) -> bool:
    target = str(p["sentence"]).strip().lower()
    # tolerate closing quotes / markdown emphasis wrapped around the sentence
    tail = text.rstrip().rstrip("\"'*_\u201d` ").rstrip().lower()
    return tail.endswith(target) or text.rstrip().lower().endswith(target)


def _v_start_with(text: str, p: Mapping) -> bool:
    words = _WORD_RE.findall(_LEADING_JUNK_RE.sub("", text))
    return bool(words) and words[0].lower() == str(p["word"]).lower()


def _v_max_sentences(text: str, p: Mapping) -> bool:
    return count_sentences(text) <= int(p["n"])


def _v_paragraphs(text: str, p: Mapping) -> bool:
    return count_paragraphs(text) == int(p["n"])


def _v_word_frequency(text: str, p: Mapping) -> bool:
    return _count_word(text, p["word"]) >= int(p["n"])


# --------------------------------------------------------------------------
# Constraint kinds: instruction template + verifier
# --------------------------------------------------------------------------

_KINDS: Dict[str, Dict] = {
    "max_words": {"template": "Answer in at most {n} words.", "verify": _v_max_words},
    "min_words": {"template": "Answer in at least {n} words.", "verify": _v_min_words},
    "include_word": {
        "template": 'Include the word "{word}" in your answer.',
        "verify": _v_include_word,
    },
    "exclude_word": {
        "template": 'Do not use the word "{word}" anywhere in your answer.',
        "verify": _v_exclude_word,
    },
    "no_commas": {"template": "Do not use any commas in your answer.", "verify": _v_no_commas},
    "lowercase": {
        "template": "Write your whole answer in lowercase letters, with no capital letters at all.",
        "verify": _v_lowercase,
    },
    "uppercase": {
        "template": "Write your whole answer in capital letters only.",
        "verify": _v_uppercase,
    },
    "bullets": {
        "template": 'Answer with exactly {n} bullet points, each on its own line starting with "- ".',
        "verify": _v_bullets,
    },
    "json_object": {
        "template": 'Reply only with a JSON object that has the key "{key}".',
        "verify": _v_json_object,
    },
    "end_with": {
        "template": 'End your answer with the exact sentence "{sentence}"',
        "verify": _v_end_with,
    },
    "start_with": {
        "template": 'Start your answer with the word "{word}".',
        "verify": _v_start_with,
    },
    "max_sentences": {
        "template": "Answer in at most {n} sentences.",
        "verify": _v_max_sentences,
    },
    "paragraphs": {
        "template": "Write exactly {n} paragraphs, separated by a blank line.",
        "verify": _v_paragraphs,
    },
    "word_frequency": {
        "template": 'Use the word "{word}" at least {n} times.',
        "verify": _v_word_frequency,
    },
}

#: Constraint kind names; the position is the ``cNN`` part of record ids.
CONSTRAINT_KINDS: List[str] = list(_KINDS)

#: Sampling weights for :func:`make_prompt_records`.  Measured on the bundled
#: SmolLM2-135M-Instruct, word limits, "no commas", "include word" and bullet
#: counts separate samples (some pass, some fail); "lowercase" and "end with a
#: sentence" never passed, so they are kept rare.
KIND_WEIGHTS: Dict[str, float] = {
    "max_words": 3.0,
    "min_words": 1.0,
    "include_word": 2.0,
    "exclude_word": 1.5,
    "no_commas": 2.5,
    "lowercase": 0.5,
    "uppercase": 0.5,
    "bullets": 2.0,
    "json_object": 0.75,
    "end_with": 0.5,
    "start_with": 1.0,
    "max_sentences": 2.0,
    "paragraphs": 1.0,
    "word_frequency": 1.5,
}

#: Kinds the tiny bundled model (almost) never satisfies: seed-pair
#: construction spends few samples on them.
LOW_SEPARATION_KINDS = frozenset({"lowercase", "uppercase", "end_with", "json_object"})

_MAX_WORDS_CHOICES = [25, 30, 35, 40, 45, 50]
_MIN_WORDS_CHOICES = [25, 30, 35, 40]
_BULLET_CHOICES = [2, 3, 4, 5]
_SENTENCE_CHOICES = [2, 3, 4]
_PARAGRAPH_CHOICES = [2, 3]
_FREQUENCY_CHOICES = [2, 3]
_JSON_KEYS = ["answer", "tips", "summary", "steps", "explanation"]
_START_WORDS = ["Sure", "Yes", "Well", "First", "Honestly", "Great", "Okay", "Absolutely"]
_END_SENTENCES = [
    "I hope this helps.",
    "Is there anything else I can help with?",
    "Thanks for asking.",
    "Good luck!",
    "That is all.",
]
_FALLBACK_WORDS = ["important", "simple", "example", "easy", "time"]

_STOPWORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before
    being below best better between both but by can could did do does doing down during each
    few for from further get gets getting good had has have having he her here hers him his
    how i if in into is it its it's itself just keep know let like make makes making me more
    most my myself new no nor not now of off often on once only or other our ours out over own
    same she should so some such than that the their theirs them then there these they this
    those through to too under until up very want was way ways we were what when where which
    while who whom why will with without would you your yours yourself okay much many help
    tell use used using start first well there's i'm don't without things thing really need
    """.split()
)


def _content_words(question: str, min_len: int = 4) -> List[str]:
    """Topical words of a question, in order, deduplicated (surface form kept)."""
    out: List[str] = []
    seen = set()
    tokens = re.findall(r"[A-Za-z][A-Za-z'\-]*", question)
    for i, tok in enumerate(tokens):
        low = tok.lower()
        if "'" in tok or "-" in tok or len(tok) < min_len or low in _STOPWORDS or low in seen:
            continue
        seen.add(low)
        # keep capitalisation of proper nouns / acronyms, lowercase the first word
        out.append(tok if (i > 0 and tok[0].isupper()) else low)
    if not out and min_len > 3:
        return _content_words(question, min_len=3)
    return out


def instruction(constraint: Mapping) -> str:
    """The instruction text appended to the question for ``constraint``."""
    kind = constraint.get("kind") if isinstance(constraint, Mapping) else None
    if kind not in _KINDS:
        raise ValueError(f"unknown constraint kind: {kind!r} (known: {', '.join(CONSTRAINT_KINDS)})")
    return _KINDS[kind]["template"].format(**(constraint.get("params") or {}))


def describe(constraint: Mapping) -> str:
    """Human-readable description, e.g. ``max_words(n=40): Answer in at most 40 words.``"""
    params = constraint.get("params") or {}
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(params.items()))
    return f"{constraint['kind']}({args}): {instruction(constraint)}"


def verify(response: str, constraint: Mapping) -> bool:
    """True when ``response`` satisfies ``constraint`` ({"kind", "params"}).

    Whitespace around the response is ignored; an empty response never passes.
    Raises ValueError for an unknown kind.
    """
    if not isinstance(constraint, Mapping):
        raise ValueError(f"constraint must be a mapping, got {type(constraint).__name__}")
    kind = constraint.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown constraint kind: {kind!r} (known: {', '.join(CONSTRAINT_KINDS)})")
    text = _clean(response)
    if not text:
        return False
    return bool(_KINDS[kind]["verify"](text, constraint.get("params") or {}))


def sample_constraint(kind: str, question: str, rng: random.Random) -> Dict:
    """Draw parameters for ``kind`` (natural for ``question``) from ``rng``."""
    if kind not in _KINDS:
        raise ValueError(f"unknown constraint kind: {kind!r}")
    words = _content_words(question) or list(_FALLBACK_WORDS)
    if kind == "max_words":
        params = {"n": rng.choice(_MAX_WORDS_CHOICES)}
    elif kind == "min_words":
        params = {"n": rng.choice(_MIN_WORDS_CHOICES)}
    elif kind in ("include_word", "exclude_word"):
        params = {"word": rng.choice(words)}
    elif kind == "bullets":
        params = {"n": rng.choice(_BULLET_CHOICES)}
    elif kind == "json_object":
        params = {"key": rng.choice(_JSON_KEYS)}
    elif kind == "end_with":
        params = {"sentence": rng.choice(_END_SENTENCES)}
    elif kind == "start_with":
        params = {"word": rng.choice(_START_WORDS)}
    elif kind == "max_sentences":
        params = {"n": rng.choice(_SENTENCE_CHOICES)}
    elif kind == "paragraphs":
        params = {"n": rng.choice(_PARAGRAPH_CHOICES)}
    elif kind == "word_frequency":
        params = {"word": rng.choice(words), "n": rng.choice(_FREQUENCY_CHOICES)}
    else:  # no_commas, lowercase, uppercase
        params = {}
    return {"kind": kind, "params": params}


def make_record(question_idx: int, constraint: Mapping) -> Dict:
    """A prompt record for ``QUESTIONS[question_idx]`` with ``constraint``."""
    kind = constraint["kind"]
    content = f"{QUESTIONS[question_idx]} {instruction(constraint)}"
    return {
        "id": f"q{question_idx:04d}-c{CONSTRAINT_KINDS.index(kind):02d}",
        "prompt": [{"role": "user", "content": content}],
        "constraint": {"kind": kind, "params": dict(constraint.get("params") or {})},
    }


def question_index(record_or_id) -> int:
    """Question index from a record or a record id (``"q0123-c05"`` -> 123)."""
    rid = record_or_id["id"] if isinstance(record_or_id, Mapping) else str(record_or_id)
    m = re.match(r"^q(\d+)-c\d+$", rid)
    if not m:
        raise ValueError(f"not a demo record id: {rid!r}")
    return int(m.group(1))


def _question_rng(seed: int, question_idx: int, salt: str = "") -> random.Random:
    return random.Random(f"spa-demo:{seed}:{question_idx}:{salt}")


def _weighted_kinds(rng: random.Random, k: int, weights: Mapping[str, float]) -> List[str]:
    """``k`` distinct kinds drawn without replacement, proportionally to weight."""
    pool = [kd for kd in CONSTRAINT_KINDS if weights.get(kd, 0) > 0]
    chosen: List[str] = []
    for _ in range(min(k, len(pool))):
        w = [weights[kd] for kd in pool]
        kd = rng.choices(pool, weights=w, k=1)[0]
        chosen.append(kd)
        pool.remove(kd)
    return chosen


def records_for_question(
    question_idx: int,
    kinds: Sequence[str],
    *,
    seed: int = 0,
    salt: str = "",
) -> List[Dict]:
    """Records for one question with the given constraint kinds (params seeded)."""
    rng = _question_rng(seed, question_idx, "params:" + salt)
    q = QUESTIONS[question_idx]
    return [make_record(question_idx, sample_constraint(kd, q, rng)) for kd in kinds]


def make_prompt_records(seed: int = 0) -> List[Dict]:
    """All question x sampled-constraint records; each question gets 1-2 kinds.

    Deterministic in ``seed``; kinds are drawn with :data:`KIND_WEIGHTS`.
    """
    records: List[Dict] = []
    for qi in range(len(QUESTIONS)):
        rng = _question_rng(seed, qi, "kinds")
        k = 2 if rng.random() < 0.5 else 1
        kinds = _weighted_kinds(rng, k, KIND_WEIGHTS)
        records.extend(records_for_question(qi, kinds, seed=seed))
    return records
