"""`python -m training.compare`, kept for scripts written before 0.1.0's layout: runs `commands.compare`."""

from commands import run
from commands.compare import main

if __name__ == "__main__":
    run(main)
