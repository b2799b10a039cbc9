//! Re-embeds the dashboard (`web/dist`, see `src/api/dashboard.rs`) when a new
//! build of it lands. Only when it exists: cargo treats a missing watched path as
//! always changed, which would recompile this crate on every build.

fn main() {
    let dist = std::path::Path::new("../../web/dist");
    if dist.is_dir() {
        println!("cargo:rerun-if-changed=../../web/dist");
    } else {
        println!("cargo:rerun-if-changed=build.rs");
    }
}
