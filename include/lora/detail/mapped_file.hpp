// Bytes of a file the readers parse in place (safetensors, GGUF): a read-only private mapping of
// the file, or a buffer owned here. The bytes live as long as any holder of the shared Storage.
#pragma once

#include <lora/error.hpp>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace lora::detail {

struct Storage {
  std::vector<std::uint8_t> owned;
  void* mapped = nullptr;
  std::size_t mapped_size = 0;
  const std::uint8_t* data = nullptr;
  std::size_t size = 0;

  Storage() = default;
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  ~Storage() {
    if (mapped) ::munmap(mapped, mapped_size);
  }
};

// The file at path, mapped read-only; errors name the path.
inline std::shared_ptr<const Storage> map_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, ": not a regular file");
  }
  auto storage = std::make_shared<Storage>();
  storage->size = static_cast<std::size_t>(st.st_size);
  if (storage->size > 0) {
    void* p = ::mmap(nullptr, storage->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int e = errno;
      ::close(fd);
      fail(path, ": cannot map: ", std::strerror(e));
    }
    storage->mapped = p;
    storage->mapped_size = storage->size;
    storage->data = static_cast<const std::uint8_t*>(p);
  }
  ::close(fd);
  return storage;
}

inline std::shared_ptr<const Storage> own_bytes(std::vector<std::uint8_t> bytes) {
  auto storage = std::make_shared<Storage>();
  storage->owned = std::move(bytes);
  storage->data = storage->owned.data();
  storage->size = storage->owned.size();
  return storage;
}

}  // namespace lora::detail
