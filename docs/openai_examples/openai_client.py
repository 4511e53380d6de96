"""Chat with `mmchat serve` through the `openai` package: a picture, then a streamed
follow-up that continues the same session.

Run it against a server with the HTTP port on (``[server] http_port``)::

    OPENAI_BASE_URL=http://127.0.0.1:8766/v1 OPENAI_API_KEY=unused \
        python docs/openai_examples/openai_client.py

With ``[server] auth_secret_env`` set, OPENAI_API_KEY is a token from ``mmchat token NAME``.
"""

import base64
import io

from openai import OpenAI


def a_picture() -> str:
    """A small PNG as a data URL (a red circle, drawn here so the example stands alone)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(img).ellipse((10, 10, 50, 50), fill="red")
    out = io.BytesIO()
    img.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def main() -> None:
    client = OpenAI()  # reads OPENAI_BASE_URL and OPENAI_API_KEY
    print([m.id for m in client.models.list()])
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "what is in this picture?"},
        {"type": "image_url", "image_url": {"url": a_picture()}}]}]
    first = client.chat.completions.create(model="mmchat", messages=messages)
    answer = first.choices[0].message.content or ""
    print("bot:", answer)

    # The whole history again, as every OpenAI client sends it: the server continues
    # the session it keeps instead of reading the history again.
    messages += [{"role": "assistant", "content": answer},
                 {"role": "user", "content": "and what colour is it?"}]
    stream = client.chat.completions.create(model="mmchat", messages=messages, stream=True)
    print("bot:", end=" ")
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


if __name__ == "__main__":
    main()
