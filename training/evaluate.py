"""`python -m training.evaluate`, kept for scripts written before 0.1.0's layout: runs `commands.evaluate`."""

from commands import run
from commands.evaluate import main

if __name__ == "__main__":
    run(main)
