// Files as the library reads and writes them: a whole text file, and files replaced atomically.
//
// write_file_atomic: a temporary file beside the target, written, fsynced, renamed over it; a
// reader sees the old file or the new one, never a part.
// write_files_atomic: several files of one directory, all or none (an adapter directory's
// weights and config): every new file is written and fsynced before any target is touched,
// then each is renamed into place; if a rename fails, the targets already replaced get their old
// files back (kept as hard links until the end). Paths that exist but are not regular files
// (a directory in a file's place) are refused before anything is written.
#pragma once

#include <lora/error.hpp>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
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

}  // namespace lora::detail
