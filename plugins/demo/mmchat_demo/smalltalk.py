"""Goodbyes, and out-of-domain prompts the bot cannot help with.

Out-of-domain prompts are built from templates and fillers. Each split has its own
templates, so the valid and test prompts are phrasings training never saw (the
test split's are the "100 out-of-domain prompts" of issue 12). Their reply says what
the bot can do; an engine with a confidence fallback may send its own text instead.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

GOODBYES = ("bye", "goodbye", "bye bye", "see you", "see you later", "good night",
            "thanks, bye", "ok bye", "i have to go now", "talk to you later", "bye for now",
            "that's all, thanks", "see ya", "farewell", "i'm off, bye")
GOODBYE_REPLY = "goodbye! have a nice day."
GOODBYE_ANSWER = "goodbye"

#: Thanks, acknowledgements and asking what the bot does, anywhere in a chat, with their
#: reply and answer label: "thanks" is not a goodbye, and "ok" is not a question. Each is
#: said in many ways (:func:`social_phrases`: a lead-in, then one of the cores).
THANKS = ("thanks", "thank you", "thanks a lot", "thank you so much", "cheers", "thx",
          "many thanks", "thanks for that", "thanks for the help", "much appreciated",
          "i appreciate it", "thank you kindly", "thanks so much", "ta", "thank u")
THANKS_LEADS = ("", "great, ", "ok, ", "perfect, ", "brilliant, ", "awesome, ", "nice, ",
                "cool, ", "that's great, ", "oh ", "wonderful, ", "lovely, ")
THANKS_REPLY, THANKS_ANSWER = "you're welcome!", "welcome"
ACKNOWLEDGEMENTS = ("ok", "okay", "cool", "nice", "great", "got it", "i see", "awesome",
                    "alright", "good", "wow", "interesting", "sure", "right", "fine",
                    "fair enough", "makes sense", "good to know", "neat", "perfect",
                    "understood", "lovely", "excellent", "noted", "k")
ACKNOWLEDGEMENT_LEADS = ("", "ah, ", "oh, ", "ok, ", "okay ", "hmm, ", "oh ", "ah ")
ACKNOWLEDGEMENT_REPLY = "ok! send me a picture, or ask me about one."
ACKNOWLEDGEMENT_ANSWER = "ok"
HELP = ("what can you do?", "help", "help me", "what do you do?", "how does this work?",
        "what are you for?", "what can i ask you?", "who are you?", "what are you?",
        "how do i use this?", "what can you help me with?", "what should i ask?",
        "what questions can you answer?", "what are you good at?", "how can you help me?",
        "what is this?", "what can i do here?", "tell me what you can do.",
        "what kind of things do you know?", "how do i start?", "what's your job?",
        "what do you understand?", "what can you tell me?", "how do you work?")
HELP_LEADS = ("", "hi, ", "so ", "um, ", "hey, ", "ok, ", "sorry, ")
HELP_REPLY = ("i can tell you about the shapes or the digit in a picture you send, in "
              "writing or out loud.")
HELP_ANSWER = "i can tell you"


class SocialTurn(NamedTuple):
    """One kind of social turn: its phrases (each core after each lead-in) and reply."""

    cores: tuple[str, ...]
    leads: tuple[str, ...]
    reply: str
    answer: str


SOCIAL = {"thanks": SocialTurn(THANKS, THANKS_LEADS, THANKS_REPLY, THANKS_ANSWER),
          "ack": SocialTurn(ACKNOWLEDGEMENTS, ACKNOWLEDGEMENT_LEADS, ACKNOWLEDGEMENT_REPLY,
                            ACKNOWLEDGEMENT_ANSWER),
          "help": SocialTurn(HELP, HELP_LEADS, HELP_REPLY, HELP_ANSWER)}


def social_phrases(kind: str) -> tuple[str, ...]:
    """Every way the corpus says a ``thanks``, ``ack`` or ``help`` turn."""
    turn = SOCIAL[kind]
    return tuple(lead + core for core in turn.cores for lead in turn.leads
                 if lead.strip(", ") != core)


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
    # slots only the training templates use (the held-out splits' prompts stay as they were)
    "animal": ("a spider", "an octopus", "a horse", "a penguin", "a bee", "a dolphin",
               "a giraffe", "an owl", "a shark", "a camel"),
    "food": ("pancakes", "lasagne", "sushi", "a curry", "lemonade", "soup", "a pizza",
             "falafel", "an apple pie", "porridge"),
    "country": ("france", "brazil", "kenya", "japan", "canada", "peru", "norway", "egypt",
                "india", "mexico"),
    "sport": ("football", "tennis", "chess", "cricket", "basketball", "golf", "rugby",
              "swimming"),
    "landmark": ("the eiffel tower", "mount everest", "the great wall", "big ben",
                 "the amazon river", "the sahara", "the colosseum", "niagara falls"),
    "subject": ("physics", "history", "algebra", "chemistry", "economics", "biology",
                "philosophy", "geography"),
    "word": ("serendipity", "ephemeral", "quarantine", "algorithm", "nostalgia", "irony",
             "photosynthesis", "inflation"),
    "thing2": ("a banana", "the sky", "grass", "snow", "a tomato", "the ocean", "a carrot",
               "coal"),
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
              "please tell me the time in {city}.",
              # knowledge, asked the way picture questions are asked ("how many ...?",
              # "what colour is ...?", "where is ...?", "describe ..."): the words that
              # follow, not the question's form, tell the picture questions apart
              "how many legs does {animal} have?", "how many people live in {city}?",
              "how many players are on a {sport} team?", "what colour is {thing2}?",
              "why is {thing2} that colour?", "where is {landmark}?", "where is {city}?",
              "where do {animal}s live?", "describe {city} to me.", "describe {landmark}.",
              "what shape is the earth?", "what does {animal} eat?",
              "is {animal} a mammal?", "is {country} in europe?", "is there life on mars?",
              "is it going to snow in {city}?", "which is bigger, {country} or {country}?",
              "which country is {landmark} in?", "what do you see when you close your eyes?",
              "what language do they speak in {country}?",
              "how tall is {landmark}?", "how long does it take to {task}?",
              "how much is {n} divided by {n}?", "what's {n} minus {n}?",
              "is {n} a prime number?",
              # requests, stories and help
              "tell me a fun fact about {animal}.",
              "tell me something about {country}.", "give me a riddle.",
              "write a haiku about {topic}.",
              "sing me a song.",
              "make up a bedtime story about {animal}.", "say something funny.",
              "what does {word} mean?", "define {word}.", "spell {word} for me.",
              "use {word} in a sentence.", "explain {subject} to a child.",
              "help me study {subject}.", "quiz me on {subject}.",
              "give me a recipe for {food}.", "how do i cook {food}?",
              "what should i have for dinner?", "is {food} healthy?",
              "order {food} for me.", "find a flight to {city}.",
              "plan a trip to {country}.", "what should i pack for {country}?",
              "what are the rules of {sport}?", "who is the best {sport} player?",
              "when is the next {event}?", "who invented the telephone?",
              "who painted the mona lisa?", "what year did world war two end?",
              "how does a rainbow form?", "why is the sea salty?",
              "how do planes fly?", "how does the internet work?",
              "write me a cover letter.", "help me write a speech.",
              "check my spelling, please.", "fix this sentence for me.",
              "write some code that sorts a list.", "how do i center a div?",
              "what's the best phone to buy?", "should i learn {lang} or {lang}?",
              "can you lend me some money?", "call my mom.", "send a text to {person}.",
              "turn on the lights.", "turn the volume up.", "open my calendar.",
              "what's on my schedule today?", "add milk to my shopping list.",
              "set a timer for {n} minutes.", "wake me up at six.",
              "what is love?", "are you a robot?", "do you dream?",
              "what's your favourite colour?", "what do you think of {person}?",
              "is it safe to swim in the sea?",
              "my head hurts, what should i take?", "how can i lose weight?",
              "give me some advice about {topic}.", "i feel sad today, cheer me up.",
              "what's a good name for a dog?", "recommend a book about {topic}.",
              "recommend a movie.", "what's trending on social media?",
              "how much does a {sport} ball cost?", "convert {n} miles to kilometres.",
              "what's the exchange rate for the euro?", "translate {word} into {lang}.",
              "what rhymes with {word}?", "can you draw me a cat?",
              "show me a picture of {animal}.", "draw a map of {country}.",
              "could you explain {subject}?", "would you write a poem for my mum?",
              "please help me plan a party.", "i'd like a recipe for {food}, please.",
              "do you know where {landmark} is?", "can you tell me what {word} means?"),
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
