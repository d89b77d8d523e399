"""Great Expectations suites (JSON) that configs extend their data contract with (package data)."""
