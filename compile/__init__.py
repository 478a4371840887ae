"""Ahead-of-time builds: `python -m compile.build` plans (plan.py), audits (audit.py) and compiles every
fixed-shape graph an engine needs into an artifact directory described by manifest.py."""
