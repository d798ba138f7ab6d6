#!/bin/bash
# Worker for the ported --no-python cases: touches $1/$RANK.
FILE="$1/$RANK"
echo "creating $FILE"
touch "$FILE"
