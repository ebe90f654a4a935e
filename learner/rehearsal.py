"""General requests a chat model is rehearsed on while it learns from corrections.

Distillation moves weights every request shares. Rehearsal keeps the model doing what it did where
nobody corrected it: each distillation batch carries some requests answered as the weights the
round started from answered them (learner/loop.py). The first source is the app's other traffic
(families the round does not distil). A deployment whose traffic is all cold -- the SmolLM2 demo,
three families the base gets wrong -- has none, and measured there, 20 SFT steps on the
corrections alone taught the formats and cost 6 to 82 points on the four tasks of SmolLM2's forgetting
suite (bench/distill.py). So a chat model is also rehearsed on these: everyday requests of the
kinds a general assistant answers.

They are *not* the forgetting suite (learner/forgetting.py): no request here is one the gate asks,
and none names a country, an antonym, a sum or a word to repeat the way the suite does. The gate
stays a test the adapter was not trained on.
"""

from __future__ import annotations

GENERAL_REQUESTS: tuple[str, ...] = (
    "Write one sentence about the sea.",
    "How do I boil an egg?",
    "Give me a tip for sleeping better.",
    "What is a noun? Explain briefly.",
    "Suggest a name for a pet goldfish.",
    "Describe the color of the sky at sunset.",
    "What should I pack for a day at the beach?",
    "Tell me a fun fact about octopuses.",
    "How many days are in a week?",
    "What do bees make?",
    "Write a short greeting for a birthday card.",
    "Explain what a recipe is in one sentence.",
    "What is the main ingredient of guacamole?",
    "Name a musical instrument with strings.",
    "Why do we need water?",
    "How do plants get energy?",
    "What is the plural of mouse?",
    "Give me a word that rhymes with cat.",
    "What do you call a baby dog?",
    "How many legs does a spider have?",
    "What season comes after spring?",
    "Write a haiku about rain.",
    "What is the boiling point of water in Celsius?",
    "Name something you can find in a kitchen.",
    "How do you say thank you in Spanish?",
    "What is the largest planet in our solar system?",
    "Explain what a library is.",
    "What animal is known for its long neck?",
    "Give me two healthy breakfast ideas.",
    "What does a thermometer measure?",
    "How many hours are in a day?",
    "What is the color of a ripe banana?",
    "Describe a cat in one sentence.",
    "What is ice made of?",
    "Write a polite way to decline an invitation.",
    "Which is heavier, a kilogram of feathers or a kilogram of stones?",
    "What tool do you use to cut paper?",
    "What is the first letter of the English alphabet?",
    "Name a fruit that is yellow.",
    "How do you make a cup of tea?",
)


def general_requests() -> list[tuple[dict, ...]]:
    """The requests as message lists (one user turn each)."""
    return [({"role": "user", "content": text},) for text in GENERAL_REQUESTS]
