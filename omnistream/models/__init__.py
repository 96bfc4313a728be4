"""Model implementations behind one small batching interface (:class:`BatchModel`).

Each model loads only from local files or from weights that ship inside an installed
package; nothing here downloads or touches the event loop.
"""

from omnistream.models.base import BatchModel

__all__ = ["BatchModel"]
