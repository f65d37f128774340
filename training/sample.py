"""`python -m training.sample`, kept for scripts written before 0.1.0's layout: runs `commands.sample`."""

from commands import run
from commands.sample import main

if __name__ == "__main__":
    run(main)
