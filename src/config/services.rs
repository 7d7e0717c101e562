//! Services files (the `file` source): one file or a directory of them,
//! read and validated with duplicates spotted across files; and `check`,
//! which validates a main config and every services file it names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::model::ServiceSpec;

use super::index::ServicesIndex;
use super::main_config::Config;
use super::raw::RawServicesFile;
use super::report::{ConfigErrors, Reporter, read_file};
use super::service::{self, ServiceDefaults};
use super::sources::SourceConfig;

/// The error for a file without a `service` key (empty, or cut by a
/// writer that has not finished).
pub const NO_SERVICE_KEY: &str = "no services in this file: it is empty or holds no `[[service]]` (a write in progress? replace services files atomically, by rename); to serve no services from it, write `service = []`";

/// Parses one services file; `index` spots duplicates across files.
pub fn parse_services(
    text: &str,
    path: &Path,
    defaults: &ServiceDefaults,
    index: &mut ServicesIndex,
) -> Result<Vec<ServiceSpec>, ConfigErrors> {
    let mut r = Reporter::new(path, text);
    let Some(raw) = r.parse::<RawServicesFile>() else {
        return r.finish(Vec::new());
    };
    let Some(services) = raw.service else {
        r.error(0..0, NO_SERVICE_KEY);
        return r.finish(Vec::new());
    };
    let specs: Vec<ServiceSpec> = services
        .iter()
        .filter_map(|s| service::validate(&mut r, s, defaults, index))
        .collect();
    r.finish(specs)
}

/// Reads and parses one services file.
pub fn load_services(
    path: &Path,
    defaults: &ServiceDefaults,
    index: &mut ServicesIndex,
) -> Result<Vec<ServiceSpec>, ConfigErrors> {
    let text = read_file(path)?;
    parse_services(&text, path, defaults, index)
}

/// The `*.toml` files a file source reads: the file itself, or the
/// directory's `*.toml` files in name order.
pub fn services_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        files.sort();
        Ok(files)
    } else {
        std::fs::metadata(path)?;
        Ok(vec![path.to_path_buf()])
    }
}

/// Reads every services file of a `file` source (`path` is one file or a
/// directory of `*.toml` files), spotting duplicates through `index`.
/// Returns each file's services, or every error found.
pub fn load_services_path(
    path: &Path,
    defaults: &ServiceDefaults,
    index: &mut ServicesIndex,
) -> Result<BTreeMap<PathBuf, Vec<ServiceSpec>>, ConfigErrors> {
    let files = services_files(path)
        .map_err(|e| ConfigErrors::whole_file(path, format!("cannot read services path: {e}")))?;
    let mut loaded = BTreeMap::new();
    let mut errors = Vec::new();
    for file in files {
        match load_services(&file, defaults, index) {
            Ok(specs) => {
                loaded.insert(file, specs);
            }
            Err(e) => errors.extend(e.0),
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Validates a main config and every services file it names, as `beacon
/// check` does. Returns the config and how many services the files hold,
/// or every error found.
pub fn check(path: &Path) -> Result<(Config, usize), ConfigErrors> {
    let config = Config::load(path)?;
    let defaults = config.service_defaults();
    let mut index = ServicesIndex::default();
    let mut errors = Vec::new();
    let mut services = 0;
    for source in &config.sources {
        let SourceConfig::File { path } = source else {
            continue;
        };
        match load_services_path(path, &defaults, &mut index) {
            Ok(files) => services += files.values().map(Vec::len).sum::<usize>(),
            Err(e) => errors.extend(e.0),
        }
    }
    errors.extend(index.reserved(&config.reserved_addrs()));
    if errors.is_empty() {
        Ok((config, services))
    } else {
        Err(ConfigErrors(errors))
    }
}
