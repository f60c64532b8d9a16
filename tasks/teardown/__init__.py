"""Teardown: find what a stack made (its record and a tag scan), delete it in dependency order for any target,
prove nothing is left; and roll back a failed deploy. The top room: imports both targets."""
