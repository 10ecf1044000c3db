// What the demo shows besides numbers: a progress bar with ETA, and an SVG plot of the curves.
#pragma once

#include <lora/error.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

// One line on stderr, redrawn at most ten times a second:
//   label       [##########··········]  50%  loss 0.4123   12s, eta 12s
// On a terminal only; elsewhere (logs, ctest) it prints nothing, the caller's summary lines remain.
class Progress {
 public:
  using Clock = std::chrono::steady_clock;

  Progress(std::string label, long total) : label_(std::move(label)), total_(std::max(1L, total)), start_(Clock::now()) {
    tty_ = isatty(fileno(stderr));
  }

  void update(long done, double loss) {
    if (!tty_) return;
    const auto now = Clock::now();
    if (done < total_ && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    const double elapsed = seconds(), frac = double(done) / double(total_);
    const double eta = done > 0 ? elapsed * (1 - frac) / frac : 0;
    const int width = 20, fill = int(frac * width + 0.5);
    std::string bar(std::size_t(fill), '#');
    bar.append(std::size_t(width - fill), '.');
    std::fprintf(stderr, "\r  %-28s [%s] %3d%%  loss %.4f  %4.0fs, eta %3.0fs ", label_.c_str(), bar.c_str(),
                 int(frac * 100 + 0.5), loss, elapsed, eta);
    std::fflush(stderr);
  }

  // Clears the bar; returns the seconds since construction.
  double finish() {
    if (tty_) std::fprintf(stderr, "\r%100s\r", "");
    return seconds();
  }

  double seconds() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

 private:
  std::string label_;
  long total_;
  Clock::time_point start_, last_{};
  bool tty_;
};

struct Curve {
  std::string name;
  std::vector<double> x, y;
};

// Line charts side by side, one per panel (title, y label, curves sharing x), written as SVG.
struct Panel {
  std::string title, ylabel;
  std::vector<Curve> curves;
};

// About five round tick values (1, 2 or 5 times a power of ten apart) within [lo, hi].
inline std::vector<double> ticks(double lo, double hi) {
  const double raw = (hi - lo) / 5, mag = std::pow(10.0, std::floor(std::log10(raw))), f = raw / mag;
  const double step = (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * mag;
  std::vector<double> t;
  for (double v = std::ceil(lo / step) * step; v <= hi + 1e-9 * step; v += step) t.push_back(std::abs(v) < 1e-12 * step ? 0 : v);
  return t;
}

inline void write_svg(const std::string& path, const std::vector<Panel>& panels, const std::string& xlabel) {
  const char* colors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"};
  const double pw = 460, ph = 320, ml = 60, mr = 20, mt = 40, mb = 50;
  std::ofstream f(path);
  if (!f) lora::detail::fail("cannot write ", path);
  char buf[512];
  auto out = [&](const char* fmt, auto... a) {
    std::snprintf(buf, sizeof buf, fmt, a...);
    f << buf;
  };
  out("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" font-size=\"12\">\n",
      pw * panels.size(), ph + 30);
  out("<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
  for (std::size_t p = 0; p < panels.size(); ++p) {
    const Panel& panel = panels[p];
    double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
    for (const Curve& c : panel.curves)
      for (std::size_t i = 0; i < c.x.size(); ++i) {
        x0 = std::min(x0, c.x[i]), x1 = std::max(x1, c.x[i]);
        y0 = std::min(y0, c.y[i]), y1 = std::max(y1, c.y[i]);
      }
    if (!(x1 > x0)) x1 = x0 + 1;
    const double pad = y1 > y0 ? 0.05 * (y1 - y0) : 0.5;
    y0 -= pad, y1 += pad;
    const double left = p * pw + ml, width = pw - ml - mr, height = ph - mt - mb;
    auto sx = [&](double x) { return left + (x - x0) / (x1 - x0) * width; };
    auto sy = [&](double y) { return mt + (y1 - y) / (y1 - y0) * height; };
    out("<text x=\"%.1f\" y=\"24\" font-size=\"14\" text-anchor=\"middle\">%s</text>\n", left + width / 2, panel.title.c_str());
    out("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#444\"/>\n", left, mt, width, height);
    for (double yv : ticks(y0, y1)) {  // grid and tick labels
      out("<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", left, left + width, sy(yv), sy(yv));
      out("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", left - 4, sy(yv) + 4, yv);
    }
    for (double xv : ticks(x0, x1)) out("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%g</text>\n", sx(xv), mt + height + 16, xv);
    out("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", left + width / 2, mt + height + 34, xlabel.c_str());
    out("<text transform=\"translate(%.1f %.1f) rotate(-90)\" text-anchor=\"middle\">%s</text>\n", left - 44, mt + height / 2,
        panel.ylabel.c_str());
    for (std::size_t c = 0; c < panel.curves.size(); ++c) {
      const Curve& curve = panel.curves[c];
      f << "<polyline fill=\"none\" stroke-width=\"1.8\" stroke=\"" << colors[c % 6] << "\" points=\"";
      for (std::size_t i = 0; i < curve.x.size(); ++i) out("%.1f,%.1f ", sx(curve.x[i]), sy(curve.y[i]));
      f << "\"/>\n";
    }
  }
  // One legend under the panels, from the first panel's curve names.
  if (!panels.empty())
    for (std::size_t c = 0; c < panels[0].curves.size(); ++c)
      out("<text x=\"%.1f\" y=\"%.1f\" fill=\"%s\">&#9632; %s</text>\n", ml + 170.0 * double(c % 5), ph + 4 + 16.0 * double(c / 5),
          colors[c % 6], panels[0].curves[c].name.c_str());
  f << "</svg>\n";
  if (!f) lora::detail::fail("cannot write ", path);
}
