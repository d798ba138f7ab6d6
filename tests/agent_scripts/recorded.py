"""Uses elastic.record: the decorator writes the error file itself."""
import os

from elastic import record


@record
def main():
    raise KeyError("recorded failure on rank %s" % os.environ["RANK"])


if __name__ == "__main__":
    main()
