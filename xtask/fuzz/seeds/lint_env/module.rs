//! A module with imports, renames, macros and nested modules.
use std::env::{self, var as read};
use std::process::Command;

mod inner {
    pub(crate) fn f() -> Option<String> {
        super::read("HOME").ok()
    }
}

macro_rules! home {
    () => {
        env!("HOME")
    };
}

fn main() {
    let _ = env::vars_os().count();
    let _ = Command::new("true").env("A", "1").status();
    let _ = option_env!("PATH");
    let _ = inner::f();
    let _ = home!();
}
