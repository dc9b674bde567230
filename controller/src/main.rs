//! `weft-controller`: parse the command line and run.

#![forbid(unsafe_code)]

fn main() {}
