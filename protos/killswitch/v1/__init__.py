"""Generated from protos/; do not edit. Run protos/generate.py."""
