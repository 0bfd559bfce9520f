//! `crdgen [DIR]`: writes the relayfed CRDs and the optional MCS CRD template as YAML into DIR
//! (default `charts/relayfed-crds/templates`, the CRD chart).

use std::path::PathBuf;

use relayfed_crds::generate::{CRD_TEMPLATES, MCS_TEMPLATE, crd_files, mcs_template};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).map_or_else(|| PathBuf::from(CRD_TEMPLATES), PathBuf::from);
    std::fs::create_dir_all(&dir)?;
    let mut files = crd_files()?;
    files.push((MCS_TEMPLATE.to_owned(), mcs_template()?));
    for (name, text) in files {
        let path = dir.join(&name);
        std::fs::write(&path, text)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
