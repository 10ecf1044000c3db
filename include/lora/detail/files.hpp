// Files as the library reads and writes them: a whole text file, and files replaced atomically.
//
// write_file_atomic: a temporary file beside the target, written, fsynced, renamed over it; a
// reader sees the old file or the new one, never a part.
// write_files_atomic: several files of one directory, all or none (an adapter directory's
// weights and config): every new file is written and fsynced before any target is touched,
// then each is renamed into place; if a rename fails, the targets already replaced get their old
// files back (kept as hard links until the end). Paths that exist but are not regular files
// (a directory in a file's place) are refused before anything is written.
// replace_directory: a whole directory replaced in one rename (PEFT adapter directories,
// training checkpoints); see below.
// fault_point: a test hook; the process kills itself there when LORA_FAULT_POINT names it
// (name@N: the N-th time it passes).
#pragma once

#include <lora/error.hpp>

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace lora::detail {

// The whole file; what names it in errors.
inline std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path, ": cannot open");
  std::ostringstream s;
  s << f.rdbuf();
  if (f.bad()) fail(path, ": read failed");
  return s.str();
}

using FileBytes = std::vector<std::uint8_t>;

// A temporary file beside path holding bytes, fsynced and closed; returns its name. Throws,
// leaving nothing behind, on any failure.
inline std::string write_temporary(const std::string& path, const FileBytes& bytes) {
  std::string tmp = path + ".tmp.XXXXXX";
  const int fd = ::mkstemp(tmp.data());
  if (fd < 0) fail(path, ": cannot create a temporary file beside it: ", std::strerror(errno));
  auto give_up = [&](const char* what) {
    const int e = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    fail(path, ": ", what, ": ", std::strerror(e));
  };
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) give_up("write failed");
    done += static_cast<std::size_t>(w);
  }
  if (::fchmod(fd, 0644) != 0) give_up("chmod failed");
  if (::fsync(fd) != 0) give_up("fsync failed");
  if (::close(fd) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    fail(path, ": close failed: ", std::strerror(e));
  }
  return tmp;
}

inline void fsync_parent(const std::string& path) {
  const std::size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

inline void write_files_atomic(const std::vector<std::pair<std::string, FileBytes>>& files) {
  for (const auto& [path, bytes] : files) {
    struct stat st;
    if (::lstat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
      fail(path, ": exists and is not a regular file; nothing was written");
  }
  std::vector<std::string> tmp, backup;
  auto remove_all = [](const std::vector<std::string>& v) {
    for (const auto& p : v)
      if (!p.empty()) ::unlink(p.c_str());
  };
  try {
    for (const auto& f : files) tmp.push_back(write_temporary(f.first, f.second));
  } catch (...) {
    remove_all(tmp);
    throw;
  }
  for (const auto& f : files) {  // the old file, if any, under a second name
    std::string b = f.first + ".old.XXXXXX";
    const int fd = ::mkstemp(b.data());
    if (fd >= 0) ::close(fd), ::unlink(b.c_str());
    backup.push_back(fd >= 0 && ::link(f.first.c_str(), b.c_str()) == 0 ? b : std::string());
  }
  for (std::size_t k = 0; k < files.size(); ++k) {
    if (::rename(tmp[k].c_str(), files[k].first.c_str()) == 0) continue;
    const int e = errno;
    for (std::size_t j = 0; j < k; ++j) {  // put back what was replaced
      if (!backup[j].empty())
        ::rename(backup[j].c_str(), files[j].first.c_str()), backup[j].clear();
      else
        ::unlink(files[j].first.c_str());
    }
    remove_all(std::vector<std::string>(tmp.begin() + k, tmp.end()));
    remove_all(backup);
    fail(files[k].first, ": rename failed: ", std::strerror(e), "; no file was changed");
  }
  remove_all(backup);
  for (const auto& f : files) fsync_parent(f.first);
}

inline void write_file_atomic(const std::string& path, const FileBytes& bytes) { write_files_atomic({{path, bytes}}); }

// For fault tests: SIGKILL to this process when the environment's LORA_FAULT_POINT is name, or
// name@N and the process passes the point for the N-th time.
inline void fault_point(const char* name) {
  const char* want = std::getenv("LORA_FAULT_POINT");
  if (!want) return;
  const char* at = std::strchr(want, '@');
  const std::size_t len = at ? std::size_t(at - want) : std::strlen(want);
  if (std::strlen(name) != len || std::strncmp(want, name, len) != 0) return;
  static long passes = 0;  // of the one point named
  if (!at || ++passes == std::atol(at + 1)) std::raise(SIGKILL);
}

inline void fsync_path(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags);
  if (fd < 0) fail(path, ": cannot open to fsync: ", std::strerror(errno));
  const int r = ::fsync(fd);
  const int e = errno;
  ::close(fd);
  if (r != 0) fail(path, ": fsync failed: ", std::strerror(e));
}

// Replaces directory dir as a whole: fill(tmp) writes the new content into tmp, a new directory
// beside dir (".<name>.tmp.XXXXXX"); then every file in it and tmp itself are fsynced, and tmp
// takes dir's place in one rename: renameat2's RENAME_EXCHANGE when dir exists (the old content
// lands in tmp's name and is removed), a plain rename when it does not. A crash leaves dir as it
// was or as fill made it, never a mixture (at worst a stray .tmp directory); an exception from
// fill removes tmp and leaves dir untouched. With carry_over, dir's entries that fill did not
// write are kept: files by hard links, subdirectories moved into tmp just before the exchange.
// Where the filesystem has no RENAME_EXCHANGE, dir moves aside (".<name>.old.XXXXXX") and tmp
// takes its name: two renames, between which a crash leaves dir only under the old name.
inline void replace_directory(const std::string& dir, const std::function<void(const std::string&)>& fill, bool carry_over = false) {
  namespace fs = std::filesystem;
  fs::path target = fs::absolute(fs::path(dir)).lexically_normal();
  if (target.filename().empty()) target = target.parent_path();  // "out/adapter/"
  std::error_code ec;
  if (fs::is_symlink(target, ec)) target = fs::canonical(target, ec);  // the directory it names is replaced
  const fs::path parent = target.parent_path(), name = target.filename();
  if (name.empty() || name == "." || name == "..") fail(dir, ": not a directory name");
  const auto status = fs::symlink_status(target, ec);
  const bool exists = fs::exists(status);
  if (exists && !fs::is_directory(status)) fail(dir, ": exists and is not a directory; nothing was written");
  fs::create_directories(parent, ec);
  if (ec) fail(parent.string(), ": cannot create: ", ec.message());
  std::string tmp = (parent / ("." + name.string() + ".tmp.XXXXXX")).string();
  if (!::mkdtemp(tmp.data())) fail(dir, ": cannot create a directory beside it: ", std::strerror(errno));
  std::vector<fs::path> subdirs, moved;  // dir's subdirectories to carry over; those already in tmp
  const auto drop = [&](const std::string& p) {  // (moved subdirectories go back first)
    for (const auto& d : moved) ::rename((fs::path(tmp) / d).c_str(), (target / d).c_str());
    moved.clear();
    std::error_code ignored;
    fs::remove_all(p, ignored);
  };
  try {
    ::chmod(tmp.c_str(), 0755);
    fill(tmp);
    if (exists && carry_over)
      for (const auto& e : fs::directory_iterator(target)) {
        const fs::path to = fs::path(tmp) / e.path().filename();
        if (fs::exists(fs::symlink_status(to))) continue;  // fill wrote it
        if (e.is_directory(ec) && !e.is_symlink(ec))
          subdirs.push_back(e.path().filename());
        else if (::link(e.path().c_str(), to.c_str()) != 0) {
          fs::copy(e.path(), to, fs::copy_options::copy_symlinks, ec);  // no hard links there: a copy
          if (ec) fail(e.path().string(), ": cannot keep it (neither a hard link nor a copy in the new directory): ", ec.message());
        }
      }
    for (const auto& e : fs::recursive_directory_iterator(tmp))
      if (e.is_regular_file() && !e.is_symlink()) fsync_path(e.path().string(), O_RDONLY);
    fault_point("replace_directory");
    for (const auto& d : subdirs) {
      if (::rename((target / d).c_str(), (fs::path(tmp) / d).c_str()) != 0)
        fail((target / d).string(), ": cannot move it into the new directory: ", std::strerror(errno));
      moved.push_back(d);
    }
    fsync_path(tmp, O_RDONLY | O_DIRECTORY);
  } catch (...) {
    drop(tmp);
    throw;
  }
  if (!exists) {
    if (::rename(tmp.c_str(), target.c_str()) != 0) {
      const int e = errno;
      drop(tmp);
      fail(dir, ": rename failed: ", std::strerror(e), "; nothing was written");
    }
  } else {
    bool swapped = false;
#ifdef RENAME_EXCHANGE
    swapped = ::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0;
#endif
    if (!swapped) {
      std::string old = (parent / ("." + name.string() + ".old.XXXXXX")).string();
      if (!::mkdtemp(old.data()) || ::rmdir(old.c_str()) != 0 || ::rename(target.c_str(), old.c_str()) != 0) {
        const int e = errno;
        drop(tmp);
        fail(dir, ": cannot move the old directory aside: ", std::strerror(e), "; nothing was changed");
      }
      if (::rename(tmp.c_str(), target.c_str()) != 0) {
        const int e = errno;
        ::rename(old.c_str(), target.c_str());
        drop(tmp);
        fail(dir, ": rename failed: ", std::strerror(e), "; nothing was changed");
      }
      tmp = old;
    }
    moved.clear();  // they are in dir now
    drop(tmp);      // the old content
  }
  fsync_path(parent.string(), O_RDONLY | O_DIRECTORY);
}

}  // namespace lora::detail
