//! `sqlx::migrate!` embeds the SQL files at compile time; without this, adding a migration
//! would not rebuild the crate (cargo only watches Rust sources), and binaries would ship
//! without it.
fn main() {
    println!("cargo:rerun-if-changed=postgres");
    println!("cargo:rerun-if-changed=sqlite");
}
