"""Research studies built on the library (experiment tables, the loop study). The library never
imports them."""
