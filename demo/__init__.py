"""The Gradio demo page (`python -m demo`); `demo/app.py` is also a ready Hugging Face Space `app.py`."""
