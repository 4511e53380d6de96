"""Goodbyes, and out-of-domain prompts the bot cannot help with.

Out-of-domain prompts are built from templates and fillers. Each split has its own
templates, so the valid and test prompts are phrasings training never saw (the
test split's are the "100 out-of-domain prompts" of issue 12). Their reply says what
the bot can do; an engine with a confidence fallback may send its own text instead.
"""

from __future__ import annotations

import numpy as np

GOODBYES = ("bye", "goodbye", "bye bye", "see you", "see you later", "good night",
            "thanks, bye", "ok bye", "i have to go now", "talk to you later", "bye for now",
            "that's all, thanks", "see ya", "farewell", "i'm off, bye")
GOODBYE_REPLY = "goodbye! have a nice day."
GOODBYE_ANSWER = "goodbye"

OUT_OF_DOMAIN_REPLY = ("sorry, i can't help with that. i can tell you about the shapes or "
                       "the digit in a picture you send, in writing or out loud.")
OUT_OF_DOMAIN_ANSWER = "can't help"

_FILL = {
    "city": ("paris", "tokyo", "berlin", "lagos", "lima", "oslo", "cairo", "sydney", "boston",
             "madrid", "delhi", "toronto"),
    "topic": ("the moon", "autumn", "my cat", "the sea", "a lost key", "coffee", "trains",
              "friendship", "rain", "a dragon"),
    "lang": ("french", "german", "spanish", "japanese", "italian", "swahili", "polish"),
    "thing": ("a table for two", "a flight to rome", "a taxi", "a hotel room", "a doctor's visit",
              "concert tickets"),
    "task": ("fix a flat tyre", "bake bread", "file my taxes", "learn python", "tie a tie",
             "change a light bulb", "train for a marathon", "grow tomatoes", "sleep better"),
    "event": ("the world cup", "the last election", "the nobel prize in physics",
              "the super bowl", "the tour de france", "eurovision"),
    "person": ("napoleon", "marie curie", "the president", "einstein", "shakespeare",
               "cleopatra", "my boss"),
    "n": ("17", "23", "144", "9", "42", "365", "1024"),
}
#: Templates per split; a template's slots are filled from :data:`_FILL`.
_TEMPLATES = {
    "train": ("what is the weather like in {city}?", "write a poem about {topic}.",
              "translate good night into {lang}.", "book me {thing}.",
              "how do i {task}?", "who won {event}?", "tell me about {person}.",
              "what is {n} times {n}?", "recommend a restaurant in {city}.",
              "what time is it in {city}?", "write an email to {person}.",
              "play some music about {topic}.", "what's the news today?",
              "set an alarm for seven.", "what is the meaning of life?",
              "summarise this article for me.", "what stocks should i buy?",
              "could you tell me about {person}?", "can you tell me the weather in {city}?",
              "i'd like to know who won {event}.", "do you know how to {task}?",
              "please tell me the time in {city}."),
    "valid": ("will it rain in {city} tomorrow?", "compose a song about {topic}.",
              "how do you say thank you in {lang}?", "can you order {thing}?",
              "explain how to {task}.", "when did {person} die?",
              "what is the square root of {n}?", "find me a cheap hotel in {city}."),
    "test": ("what's the forecast for {city}?", "tell me a joke about {topic}.",
             "say hello in {lang}.", "please reserve {thing}.", "give me tips to {task}.",
             "who was the winner of {event}?", "write a short story about {person}.",
             "calculate {n} plus {n}.", "what should i see in {city}?",
             "how old is {person}?", "tell me a joke.", "what is bitcoin worth today?",
             "can you help me with my homework?", "how far is {city} from here?",
             "remind me to call {person}.", "what's your favourite film about {topic}?"),
}


def out_of_domain(split: str, count: int, rng: np.random.Generator,
                  exclude: set[str] = frozenset()) -> list[str]:
    """``count`` distinct prompts from the split's templates (fewer if they run out),
    none whose words are in ``exclude`` (for example the chit-chat corpus's prompts)."""
    seen: list[str] = []
    templates = _TEMPLATES[split]
    for _ in range(count * 50):
        if len(seen) == count:
            break
        template = templates[int(rng.integers(len(templates)))]
        text = template
        while "{" in text:
            slot = text[text.index("{") + 1: text.index("}")]
            options = _FILL[slot]
            text = text.replace("{" + slot + "}", options[int(rng.integers(len(options)))], 1)
        key = " ".join("".join(c if c.isalnum() else " " for c in text).split())
        if text not in seen and key not in exclude:
            seen.append(text)
    return seen
