use std::env as e;
fn f() { let _ = e::var("A"); let _ = env!("HOME"); std::env::set_var("X", "1"); }
macro_rules! m { () => { std::env::vars() } }
