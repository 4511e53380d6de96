"""Out-of-domain prompts written apart from the demo corpus's templates: how often each
gets the fallback (the engine's, or the model's own "can't help"), with no picture and,
for every third, after a picture and a question about it; and whether any reply runs to
the token limit.

Usage: python tests/check_out_of_domain.py CHECKPOINT [CHECKPOINT ...]
(CHECKPOINT: `bundled` or a checkpoint directory). docs/model-card.md's "Out-of-domain
prompts written for this card" comes from this script.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alt_renderer import picture  # noqa: E402
from test_bundled_model_v2 import sees_the_fallback  # noqa: E402

from mmchat import Attachment  # noqa: E402
from mmchat.config import from_dict  # noqa: E402
from mmchat.sync import SyncEngine  # noqa: E402

PROMPTS = [
    "what's the population of china?", "how do volcanoes erupt?",
    "write a thank-you note to my teacher", "what's 15% of 80?",
    "can you recommend a good hiking trail?", "who wrote pride and prejudice?",
    "what time does the bank open?", "how do i reset my password?", "is coffee bad for you?",
    "what's the speed of light?", "find me a plumber", "how do i make a sourdough starter?",
    "what's the best way to learn guitar?", "tell me about black holes",
    "who is the king of england?", "what is the tallest building in the world?",
    "how many continents are there?", "how many days are in a leap year?",
    "what colour are flamingos?", "where can i buy cheap shoes?",
    "describe the taste of chocolate", "what do you think about politics?",
    "can you do my laundry?", "give me directions to the station",
    "what's a good gift for my dad?", "how do i get rid of hiccups?",
    "explain quantum computing", "what's the difference between a virus and a bacterium?",
    "summarize the plot of hamlet", "what happened in 1066?",
    "how many moons does jupiter have?", "what colour is a zebra?",
    "where is the nearest pharmacy?", "what shape is a rugby ball?", "is the sun a star?",
    "describe your ideal holiday", "what do you see in my future?",
    "which is heavier, a kilo of feathers or a kilo of steel?",
    "which side of the road do they drive on in the uk?", "how many shapes of pasta are there?",
    "hey, can you help me write a resume?", "i need a lawyer", "book a dentist appointment",
    "how's the stock market doing?", "what's the score of the game?",
    "play my workout playlist", "turn off the heating", "lock the front door",
    "order me an uber", "how long should i boil an egg?", "what wine goes with fish?",
    "is it going to be sunny this weekend?", "what's the wifi password?",
    "how do i say 'where is the train station' in portuguese?", "what's the square of 12?",
    "solve x + 3 = 7", "convert 30 celsius to fahrenheit", "what year is it?",
    "who discovered penicillin?", "why do cats purr?", "how do bees make honey?",
    "what's the longest river in africa?", "how deep is the ocean?",
    "can you keep a secret?", "what's your name?", "how old are you?",
    "do you like music?", "what's the meaning of this dream i had?",
    "write a python function to reverse a string", "debug my javascript",
    "what's the latest iphone?", "compare cats and dogs as pets",
    "give me a workout plan", "how many calories are in a banana?",
    "i'm bored, entertain me", "sing happy birthday", "write a rap about pizza",
    "what are your opinions on climate change?", "how do i apply for a passport?",
    "what's the best pizza topping?", "can you tell me a bedtime story?",
    "who's going to win the champions league?", "what's the capital of australia?",
    "what's the time in new york?", "will you marry me?", "teach me to knit",
    "what should i name my startup?", "how do i fix a leaking tap?",
    "where should i go on holiday?", "find the nearest coffee shop",
    "how much is a flight to london?", "tell me the news", "read me my emails",
    "what are the symptoms of flu?", "recommend a tv series",
    "how do magnets work?", "why is the sky blue?", "what's inside the earth?",
    "how far away is the moon?", "is it rude to be late?",
]
assert len(PROMPTS) == 100, len(PROMPTS)


def measure(checkpoint: str) -> None:
    engine = SyncEngine(from_dict({"model": {"checkpoint": checkpoint}}, env={}))
    img = picture([("circle", "red", 0.25, 0.5, 0.12), ("square", "blue", 0.75, 0.5, 0.12)])
    alone, after, asked_after, limit, misses = 0, 0, 0, 0, []
    try:
        for i, text in enumerate(PROMPTS):
            r = engine.reply(f"ood-{i}", text, [])
            fell_back = sees_the_fallback(r)
            alone += fell_back
            limit += r.finish_reason not in ("stop", "loop")
            if not fell_back:
                misses.append((text, r.text))
            if i % 3 == 0:
                s = f"ood-picture-{i}"
                engine.reply(s, "what colour is the circle?", [Attachment(*img)])
                r = engine.reply(s, text, [])
                after += sees_the_fallback(r)
                asked_after += 1
                limit += r.finish_reason not in ("stop", "loop")
    finally:
        engine.close()
    print(f"## {checkpoint}\nno picture: {alone}/{len(PROMPTS)}  after a picture: "
          f"{after}/{asked_after}  replies that ran to the limit: {limit}")
    for text, reply in misses:
        print(f"  missed with no picture: {text!r} -> {reply!r}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for checkpoint in sys.argv[1:]:
        measure(checkpoint)
