//! Builds an image from the command line (a stand-in for `atelier image build`):
//! `build_image <name> <images_dir> <cache_dir> <agent_binary> [--force]`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!("usage: build_image <name> <images_dir> <cache_dir> <agent_binary> [--force]");
        std::process::exit(2);
    }
    let mut opts = atelier_image::BuildOptions::new(&args[0], &args[1], &args[2], &args[3]);
    opts.force = args.iter().any(|a| a == "--force");
    opts.progress = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        atelier_image::indicatif_progress()
    } else {
        std::sync::Arc::new(|ev: &atelier_image::ProgressEvent<'_>| match ev {
            atelier_image::ProgressEvent::Message { .. } => {}
            other => eprintln!("{other:?}"),
        })
    };
    let t = std::time::Instant::now();
    match atelier_image::build(&opts) {
        Ok(img) => {
            println!("{} in {:.1}s", img.dir.display(), t.elapsed().as_secs_f64());
            println!("cmdline: {}", img.cmdline());
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
